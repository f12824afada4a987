"""``studio merge`` / ``studio resize`` / ``studio extract``.

    python -m studio merge OUT.safetensors A.safetensors:0.7 B.safetensors:-0.3 [--rank R | --concat]
                           [--energy F] [--blocks te=0.5,out=0.8] [--into BASE.safetensors] [--dtype fp16]
    python -m studio resize IN.safetensors OUT.safetensors --rank R [--energy F]
    python -m studio extract TUNED.safetensors BASE.safetensors OUT.safetensors --rank R [--conv-rank R]
"""

from __future__ import annotations

DTYPES = ("fp16", "bf16", "fp32")


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _progress(frac: float, name: str) -> None:
    import sys

    sys.stderr.write(f"\r{frac:6.1%} {name[:70]:<70}")
    if frac >= 1.0:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_merge(args) -> int:
    from studio.errors import StudioError
    from studio.jobs import GPU
    from studio.merge.blend import parse_blocks, parse_input

    blocks = parse_blocks(args.blocks)
    inputs = [parse_input(s, blocks) for s in args.inputs]
    for inp in inputs:
        if not inp.path.is_file():
            raise StudioError(f"{inp.path} does not exist.", "Give each input as PATH or PATH:WEIGHT.")
    progress = None if args.quiet else _progress
    with GPU.job("merge", args.out):
        if args.into:
            if args.rank or args.energy or args.concat:
                raise StudioError("--into bakes the adapters exactly; --rank / --energy / --concat do not apply.",
                                  "Drop them, or merge to a LoRA first.")
            from studio.merge.bake import bake

            res = bake(args.into, inputs, args.out, _dtype(args.dtype), progress)
        else:
            from studio.merge.lora_merge import merge_adapters

            method = "svd" if (args.rank or args.energy) and not args.concat else "concat"
            res = merge_adapters(inputs, args.out, method, args.rank, args.energy, _dtype(args.dtype),
                                 progress=progress)
    print(res.summary())
    return 0


def cmd_resize(args) -> int:
    from studio.jobs import GPU
    from studio.merge.lora_merge import resize_adapter

    with GPU.job("merge", args.out):
        res = resize_adapter(args.input, args.out, args.rank, args.energy, _dtype(args.dtype),
                             None if args.quiet else _progress)
    print(res.summary())
    return 0


def cmd_extract(args) -> int:
    from studio.jobs import GPU
    from studio.merge.extract import extract

    with GPU.job("merge", args.out):
        res = extract(args.tuned, args.base, args.out, args.rank, args.conv_rank, args.min_diff, _dtype(args.dtype),
                      None if args.quiet else _progress)
    print(res.summary())
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("merge", help="blend LoRAs by weight into one LoRA, or bake them into a checkpoint",
                       description="Blend adapters of one model family. Default: exact concat (rank = sum of "
                                   "ranks). --rank / --energy: SVD re-rank. --into: bake into a checkpoint.")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("inputs", nargs="+", help="adapter files as PATH or PATH:WEIGHT (negative subtracts)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, help="re-rank the blend to this rank (SVD; with --energy: the most)")
    how.add_argument("--concat", action="store_true", help="exact blend, rank = sum of the input ranks (default)")
    p.add_argument("--energy", type=float, help="dynamic rank: keep this fraction of each module's energy (0-1]")
    p.add_argument("--blocks", help="per-block weights for every input, e.g. te=0.5,in=1,mid=0,out4=0.3")
    p.add_argument("--into", metavar="BASE", help="bake into this single-file checkpoint; OUT is a checkpoint")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="output precision (default fp16)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("resize", help="re-rank a LoRA to a lower rank (alpha/rank kept)")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--rank", type=int, help="new rank (with --energy: the most)")
    p.add_argument("--energy", type=float, help="dynamic rank by energy fraction (0-1]")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("extract", help="extract a LoRA from a fine-tuned checkpoint minus its base")
    p.add_argument("tuned")
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=32, help="rank of attention / text-encoder modules (default 32)")
    p.add_argument("--conv-rank", type=int, help="also extract the ResNet convs (LoCon) at this rank")
    p.add_argument("--min-diff", type=float, default=1e-6, help="skip modules whose largest change is below this")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_extract)
