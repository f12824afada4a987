"""Adapter Studio: ``python app.py`` serves the studio at http://127.0.0.1:7860.

Options: --host, --port, --share, --auth USER:PASS, --auth-file FILE, --no-browser,
--workspace DIR, --models-dir DIR (repeatable). Heavy libraries (torch, diffusers, transformers,
peft) are imported only when a tab first needs them, so the page is up fast.
"""

from __future__ import annotations

import argparse
import os
import sys

# Must be set before gradio is imported: it reads this once to decide whether to send telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _uploads_dir() -> str:
    """Where Gradio keeps uploaded files: a known folder under the studio's cache, so it can be the
    one place outside the workspace that browser paths may point at (the user's own uploads)."""
    from studio.places import cache_dir

    return str(cache_dir() / "uploads")

TABS = [("Dataset", "ui.dataset_tab"), ("Train", "ui.train_tab"), ("Merge", "ui.merge_tab"),
        ("Generate", "ui.generate_tab"), ("Inspect", "ui.inspect_tab")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Adapter Studio")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("STUDIO_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also serve a public Gradio link (always password-protected)")
    p.add_argument("--auth", help="USER:PASSWORD required to use the studio")
    p.add_argument("--auth-file", help="file with one USER:PASSWORD per line")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.add_argument("--workspace", help="folder for datasets, runs and outputs (remembered)")
    p.add_argument("--models-dir", action="append", default=[],
                   help="a webUI install or checkpoint folder to list models from (repeatable, remembered)")
    return p.parse_args(argv)


def build_app(ctx):
    import importlib

    os.environ.setdefault("GRADIO_TEMP_DIR", _uploads_dir())

    import gradio as gr

    from ui import model_picker, settings_panel

    with gr.Blocks(title="Adapter Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Adapter Studio\nTeach Stable Diffusion a face, an object or a style on your own GPU.")
        ctx.model_picker = model_picker.build(ctx)
        settings_panel.build(ctx)
        with gr.Tabs() as tabs:
            ctx.tabs = tabs
            for label, module in TABS:
                with gr.Tab(label, id=label.lower()) as tab:
                    ctx.components[f"tab:{label.lower()}"] = tab  # so a tab can react to being opened
                    importlib.import_module(module).build(ctx)
        for hook in ctx.on_built:
            hook()
    return demo


def make_context(args):
    from studio.places import Settings, Workspace
    from ui.context import AppContext

    from studio.places import apply_hf_token

    settings = Settings.load()
    apply_hf_token()
    changed = False
    if args.workspace:
        settings.workspace = str(os.path.abspath(args.workspace))
        changed = True
    for d in args.models_dir:
        d = os.path.abspath(d)
        if d not in settings.models_dirs:
            settings.models_dirs.append(d)
            changed = True
    if changed:
        settings.save()
    workspace = Workspace(settings.workspace_path()).ensure()
    return AppContext(settings=settings, workspace=workspace, models_dirs=list(settings.models_dirs))


def main(argv=None) -> int:
    from studio.errors import StudioError
    from studio.security import decide_auth, is_loopback

    args = parse_args(argv)
    from studio.quiet import quiet_libraries

    quiet_libraries()
    try:
        users, generated = decide_auth(args.host, args.share, args.auth, args.auth_file)
        ctx = make_context(args)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ctx.remote = bool(args.share or not is_loopback(args.host))
    if generated:
        print("\n  The studio is reachable from other machines, so it needs a password.\n"
              f"  user: studio\n  password: {generated}\n", flush=True)
    demo = build_app(ctx)
    from starlette.middleware import Middleware

    from ui.auth_gate import AuthGate

    allowed = ctx.roots()
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=users,
        inbrowser=not args.no_browser, allowed_paths=allowed, show_error=True, footer_links=[],
        max_file_size=os.environ.get("STUDIO_MAX_UPLOAD", "2gb"), app_kwargs={"middleware": [Middleware(AuthGate)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
