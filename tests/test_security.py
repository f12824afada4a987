"""Studio shell: password whenever the studio leaves loopback, file access confined to its roots,
one GPU job at a time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from studio.errors import StudioError
from studio.jobs import GpuGate
from studio.security import decide_auth, is_loopback, parse_auth, read_auth_file, safe_path

ROOT = Path(__file__).resolve().parents[1]


def test_loopback_needs_no_password_but_everything_else_does():
    assert decide_auth("127.0.0.1", share=False) == (None, None)
    for host, share in [("127.0.0.1", True), ("0.0.0.0", False), ("192.168.1.20", False), ("::", False)]:
        users, generated = decide_auth(host, share)
        assert users and users[0][0] == "studio"
        assert generated and len(generated) >= 20 and users[0][1] == generated
    # two generated passwords are never the same
    assert decide_auth("0.0.0.0", False)[1] != decide_auth("0.0.0.0", False)[1]
    # a given password is used as is, and nothing is generated
    assert decide_auth("0.0.0.0", True, auth="me:secret") == ([("me", "secret")], None)


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.2") and not is_loopback("example.com")


def test_auth_parsing_errors_and_file(tmp_path):
    with pytest.raises(StudioError, match="USER:PASSWORD"):
        parse_auth("nopassword")
    f = tmp_path / "users.txt"
    f.write_text("# friends\nalice:wonder\n\nbob:builder\n")
    assert read_auth_file(f) == [("alice", "wonder"), ("bob", "builder")]
    assert decide_auth("0.0.0.0", False, auth_file=str(f))[0] == [("alice", "wonder"), ("bob", "builder")]
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(StudioError, match="no USER:PASSWORD"):
        read_auth_file(tmp_path / "empty.txt")


def test_safe_path_refuses_traversal_symlinks_and_absolute_paths(tmp_path):
    ws = tmp_path / "ws"
    (ws / "datasets").mkdir(parents=True)
    (ws / "datasets" / "a.png").write_bytes(b"x")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("s")
    os.symlink(outside, ws / "datasets" / "link")
    assert safe_path("datasets/a.png", [ws]) == (ws / "datasets" / "a.png").resolve()
    assert safe_path(ws / "datasets" / "a.png", [ws], must_exist=True).exists()
    for bad in ["../../etc/passwd", "datasets/../../secret/key.txt", "/etc/passwd", str(outside / "key.txt"),
                "datasets/link/key.txt", "~/.ssh/id_rsa"]:
        with pytest.raises(StudioError, match="outside the studio's folders"):
            safe_path(bad, [ws])
    with pytest.raises(StudioError, match="does not exist"):
        safe_path("datasets/missing.png", [ws], must_exist=True)


def test_hf_token_is_owner_only(tmp_path):
    from studio.places import hf_token_path, load_hf_token, save_hf_token

    p = save_hf_token("hf_abc123")
    assert load_hf_token() == "hf_abc123"
    assert (p.stat().st_mode & 0o777) == 0o600
    save_hf_token("")
    assert not hf_token_path().exists()


def test_gpu_gate_runs_jobs_one_after_another():
    gate = GpuGate()
    spans, lock = [], threading.Lock()

    def job(name):
        with gate.job("generate", name):
            t0 = time.perf_counter()
            time.sleep(0.2)
            with lock:
                spans.append((t0, time.perf_counter(), name))

    threads = [threading.Thread(target=job, args=(f"j{i}",)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # arrival order j0, j1, j2
    for t in threads:
        t.join()
    spans.sort()
    assert [s[2] for s in spans] == ["j0", "j1", "j2"]  # first come, first served
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        assert start >= end  # never two at once
    assert gate.status()["busy"] is False


def test_gpu_gate_refuses_when_asked_not_to_wait():
    gate = GpuGate()
    with gate.job("train", "my run"):
        with pytest.raises(StudioError, match="GPU is busy: train 'my run'"):
            gate.acquire("generate", wait=False)
        assert gate.status()["kind"] == "train"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url, data=None, headers=None) -> int:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def lan_studio(tmp_path):
    """The studio listening on all interfaces without --auth: it must generate and require a password."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--no-browser", "--host", "0.0.0.0", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    password, lines = None, []
    deadline = time.time() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if "password:" in line:
                password = line.split("password:", 1)[1].strip()
            if "Running on" in line or time.time() > deadline:
                break
        assert password, "no generated password printed:\n" + "".join(lines)
        base = f"http://127.0.0.1:{port}"
        while _status(base + "/") not in (200, 401):
            assert time.time() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.3)
        yield base, password
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lan_mode_refuses_unauthenticated_requests(lan_studio):
    base, password = lan_studio
    # The page itself is only a login form: no component of the studio is sent.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/", timeout=10)
    assert err.value.code == 401
    html = err.value.read().decode()
    assert '"auth_required":true' in html.replace(" ", "") and "Base model" not in html
    # The API, the config and file access all refuse.
    assert _status(base + "/config") == 401
    assert _status(base + "/gradio_api/info") == 401
    assert _status(base + "/gradio_api/queue/join", data=b"{}", headers={"content-type": "application/json"}) == 401
    assert _status(base + "/gradio_api/file=/etc/passwd") in (401, 403)
    # A wrong password is refused, the right one opens the studio.
    assert _status(base + "/login", data=urllib.parse.urlencode({"username": "studio", "password": "x"}).encode()) in (400, 401)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    r = opener.open(base + "/login", data=urllib.parse.urlencode({"username": "studio", "password": password}).encode())
    assert r.status == 200
    with opener.open(base + "/config", timeout=10) as r:
        assert r.status == 200 and b"Base model" in r.read()
    with opener.open(base + "/", timeout=10) as r:  # logged in: the full page
        assert r.status == 200 and b"Base model" in r.read()
    # Even logged in, files outside the studio's folders are not served.
    try:
        code = opener.open(base + "/gradio_api/file=/etc/passwd", timeout=10).status
    except urllib.error.HTTPError as err:
        code = err.code
    assert code in (403, 404)


def test_share_mode_always_passes_a_password_to_gradio(monkeypatch, capsys):
    import gradio as gr

    import app

    seen = {}

    def fake_launch(self, **kw):
        seen.update(kw)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    assert app.main(["--share", "--no-browser"]) == 0
    assert seen["share"] is True
    assert seen["auth"] and seen["auth"][0][0] == "studio" and len(seen["auth"][0][1]) >= 20
    assert seen["auth"][0][1] in capsys.readouterr().out  # printed for the user to pass on
    # allowed_paths are exactly the studio's roots
    from studio.places import Settings

    from studio.places import cache_dir

    assert seen["allowed_paths"] == [str(Path(Settings.load().workspace_path()).resolve()),
                                     str(cache_dir() / "uploads")]


def _wired(demo, name):
    return [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc", "datasets/../../../"])
def test_dataset_tab_refuses_paths_outside_the_studio(bad, tmp_path):
    """The handlers as wired in the page (not the studio functions) check every browser path."""
    import gradio as gr

    import app

    ctx = app.make_context(app.parse_args([]))
    demo = app.build_app(ctx)
    calls = {"check": (bad, ""), "gallery": (bad, ""), "tag_rows": (bad, ""), "buckets": (bad, "", 512, 64),
             "save_caption": (bad + "/x.png", "caption"), "_bring": (None, bad, "Use in place", "")}
    for name, args in calls.items():
        fns = _wired(demo, name)
        assert fns, f"handler {name} not found in the page"
        for fn in fns:
            with pytest.raises(gr.Error, match="outside the studio's folders"):
                fn(*args)
    assert not (Path("/etc") / "x.txt").exists()


def test_inspect_and_generate_tabs_refuse_paths_outside_the_studio():
    import gradio as gr

    import app
    from ui.generate_tab import MAX_ADAPTERS

    ctx = app.make_context(app.parse_args([]))
    demo = app.build_app(ctx)
    inspect = _wired(demo, "checked_inspect")[0]
    md, meta, fig = inspect("../../etc/passwd", False)
    assert "outside the studio's folders" in md and meta == {}
    run = _wired(demo, "_run")[0]
    adapters = ["/etc/passwd", 1.0, 1.0, False] + [None, 1.0, 1.0, False] * (MAX_ADAPTERS - 1)
    values = ["tiny:sd1", "a dog", "", "Euler a", 1, 7, 64, 64, 0, 1, 1, [], *adapters]
    with pytest.raises(gr.Error, match="outside the studio's folders"):
        run("(none)", "", "(none)", "", *values)
    values = ["tiny:sd1", "a dog", "", "Euler a", 1, 7, 64, 64, 0, 1, 1, ["../../../etc/hosts"],
              *([None, 1.0, 1.0, False] * MAX_ADAPTERS)]
    with pytest.raises(gr.Error, match="outside the studio's folders"):
        run("(none)", "", "(none)", "", *values)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x", "*", ".hidden"])
def test_lora_tags_cannot_name_paths(name):
    from studio.generate.engine import find_lora

    with pytest.raises(StudioError, match="not a LoRA name"):
        find_lora(name)


def test_two_simultaneous_generate_requests_run_one_after_the_other(monkeypatch, tiny_sd1):
    """Through the real generate() path: the second request waits for the first to finish."""
    import torch

    from studio.generate import engine

    spans, lock = [], threading.Lock()
    real = engine.txt2img

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        time.sleep(0.2)  # widen the window in which an overlap would show
        with lock:
            spans.append((t0, time.perf_counter()))
        return out

    monkeypatch.setattr(engine, "txt2img", timed)
    req = dict(model=str(tiny_sd1), steps=2, width=64, height=64, save=False, device="cpu", dtype=torch.float32)
    engine.generate(engine.GenerateRequest(prompt="warm up", seed=1, **req))  # load the model once
    spans.clear()
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, engine.generate(engine.GenerateRequest(prompt=f"request {i}", seed=i, **req)))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1, f"the two generations overlapped: {spans}"


def test_building_the_page_imports_no_heavy_library():
    """The page is up fast because torch / diffusers / transformers / peft load only when used."""
    code = ("import sys, app; ctx = app.make_context(app.parse_args([])); app.build_app(ctx); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
