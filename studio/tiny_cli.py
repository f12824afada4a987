"""``studio tiny-model``: write the tiny demo model (random weights) for trying the studio offline."""

from __future__ import annotations


def add_cli(sub) -> None:
    p = sub.add_parser("tiny-model", help="build a tiny random SD1.x / SDXL model offline (for tests and demos)")
    p.add_argument("out", help="output folder (diffusers) or .safetensors file (with --single-file)")
    p.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    p.add_argument("--single-file", action="store_true", help="write one .safetensors in the webUI layout")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from studio.tiny import save_tiny_model

    out = save_tiny_model(args.out, args.family, single_file=args.single_file, seed=args.seed)
    print(out)
    return 0
