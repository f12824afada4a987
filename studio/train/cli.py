"""``python -m studio train CONFIG.json [--preset NAME] [--set key=value ...] [--resume RUN_DIR]``.

Runs headless with a progress bar; works unchanged under ``accelerate launch --num_processes N``
(only the main process writes). SIGINT / SIGTERM save a checkpoint and the adapter so far.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_cli(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA / LoCon / LoHa / LoKr / DoRA adapter",
                       description="Train an adapter from a JSON config (same keys as presets/*.json). "
                                   "Order: preset < config file < --set.")
    p.add_argument("config", nargs="?", help="config JSON (optional with --resume)")
    p.add_argument("--preset", help="start from presets/NAME.json (see --list-presets)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--estimate", action="store_true", help="print the VRAM / time estimate and exit")
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (events.jsonl is still written)")
    p.set_defaults(func=run)


def run(args) -> int:
    from studio.errors import StudioError
    from studio.quiet import quiet_libraries

    quiet_libraries()
    from studio.train.config import list_presets, load_preset, resolve_config

    if args.list_presets:
        for name in list_presets():
            print(f"{name:20s} {load_preset(name).get('description', '')}")
        return 0
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise StudioError(f"{run_dir} is not a run folder (no config.json).", "Pass the run folder to --resume.")
        cfg = resolve_config(run_dir / "config.json", None, args.sets)
    else:
        if not args.config and not args.preset:
            raise StudioError("No config given.", "Pass a config JSON file (and/or --preset NAME).")
        cfg = resolve_config(args.config or {}, args.preset, args.sets)
        run_dir = None
    if args.estimate:
        from studio.train.estimate import estimate

        print(json.dumps(estimate(cfg), indent=2))
        return 0
    import signal

    from studio.train.engine import request_stop, train

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    out = train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    print(out)
    return 0
