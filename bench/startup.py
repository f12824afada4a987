"""Time from launching `python app.py` to its first HTTP 200, next to a bare Gradio Blocks app
started the same way in the same run. Target: the studio at most 1.5x the bare app.

    .venv/bin/python bench/startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE = """
import os, sys
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr
with gr.Blocks(analytics_enabled=False) as demo:
    gr.Markdown("bare")
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), inbrowser=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_200(cmd: list[str], port: int, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"{cmd} exited with {proc.returncode}")
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "STUDIO_CONFIG_DIR": f"{tmp}/cfg", "STUDIO_WORKSPACE": f"{tmp}/ws",
           "STUDIO_CACHE_DIR": f"{tmp}/cache", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    bare_file = Path(tmp) / "bare_app.py"
    bare_file.write_text(BARE)
    bare, studio = [], []
    for _ in range(args.runs):  # interleaved, so machine load affects both alike
        p = free_port()
        bare.append(time_to_200([sys.executable, str(bare_file), str(p)], p, env))
        p = free_port()
        studio.append(time_to_200([sys.executable, "app.py", "--no-browser", "--port", str(p)], p, env))
    b, s = statistics.median(bare), statistics.median(studio)
    print(f"bare gradio Blocks: median {b:.2f} s  ({', '.join(f'{x:.2f}' for x in bare)})")
    print(f"adapter studio:     median {s:.2f} s  ({', '.join(f'{x:.2f}' for x in studio)})")
    print(f"ratio studio/bare:  {s / b:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
