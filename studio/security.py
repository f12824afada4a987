"""Who may use the studio, and which files a request may touch.

A share link or a LAN address hands the GPU and the disk to whoever has the URL, so the studio
never serves anything but loopback without a password, and every path that comes from a browser
is resolved (symlinks followed) and must lie inside the workspace or a configured model folder.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from studio.errors import StudioError


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise StudioError(f"--auth must look like USER:PASSWORD, got {value!r}.", "Example: --auth me:a-long-password")
    return user, password


def read_auth_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """One ``user:password`` per line; blank lines and ``#`` comments ignored."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise StudioError(f"Cannot read the auth file {p}: {err.strerror or err}", "Check the path.") from err
    users = [parse_auth(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    if not users:
        raise StudioError(f"The auth file {p} has no USER:PASSWORD lines.", "Add at least one.")
    return users


def decide_auth(host: str, share: bool, auth: str | None = None, auth_file: str | None = None
                ) -> tuple[list[tuple[str, str]] | None, str | None]:
    """The credentials to enforce, and a generated password to print (or None).

    Loopback without share: no password unless one was given. Share or any other address:
    a password always; if the user gave none, a strong one is generated.
    """
    users: list[tuple[str, str]] = []
    if auth:
        users.append(parse_auth(auth))
    if auth_file:
        users.extend(read_auth_file(auth_file))
    if users:
        return users, None
    if share or not is_loopback(host):
        password = secrets.token_urlsafe(18)
        return [("studio", password)], password
    return None, None


def safe_path(path: str | os.PathLike, roots, must_exist: bool = False) -> Path:
    """Resolve ``path`` and check it lies inside one of ``roots``; raise StudioError otherwise.

    Relative paths are taken relative to the first root. Symlinks are resolved before the check,
    so a link that leads out of a root is refused like ``..`` or an absolute path elsewhere.
    """
    roots = [Path(r).expanduser().resolve() for r in roots if r]
    if not roots:
        raise StudioError("No folder is open to this request.", "Set a workspace in Settings.")
    raw = Path(str(path)).expanduser()
    candidate = raw if raw.is_absolute() else roots[0] / raw
    resolved = candidate.resolve()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise StudioError(f"Refused: {path} is outside the studio's folders.",
                          "Use files inside the workspace or a configured model folder "
                          "(add folders in Settings).")
    if must_exist and not resolved.exists():
        raise StudioError(f"{path} does not exist.", "Check the name.")
    return resolved
