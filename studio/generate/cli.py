"""``studio generate``: text-to-image with adapters, as the Generate tab does it."""

from __future__ import annotations


def _lora_arg(text: str):
    """``FILE`` or ``FILE:W`` or ``FILE:W_UNET:W_TE`` (a Windows drive colon is kept)."""
    from studio.errors import StudioError
    from studio.generate.engine import AdapterChoice

    head, parts = text, []
    while True:
        base, sep, tail = head.rpartition(":")
        if not sep or not _is_number(tail) or len(parts) == 2:
            break
        parts.insert(0, float(tail))
        head = base
    if not head:
        raise StudioError(f"--lora {text!r} names no file.", "Write --lora FILE:0.8")
    return AdapterChoice(head, *(parts or [1.0]))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _size(text: str) -> tuple[int, int]:
    from studio.errors import StudioError

    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise StudioError(f"--size {text!r} is not WIDTHxHEIGHT.", "Write it like --size 512x768.") from None


def add_cli(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image with adapters applied as webUIs apply them")
    p.add_argument("--model", required=True, help="base model: file, diffusers folder, hub id or tiny:sd1")
    p.add_argument("--prompt", required=True, help="webUI syntax: (word:1.2), [word], BREAK, <lora:name:0.8>")
    p.add_argument("--negative", default="")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:W_TE]]",
                   help="adapter file and weight (repeatable); any kind: LoRA, LoCon, LoHa, LoKr, DoRA, full")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="textual-inversion embedding; write its file name (stem) in the prompt")
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda / cpu / mps (default: best available)")
    p.add_argument("--out", required=True, help="output PNG (more images of a batch get -1, -2 ...)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    from studio.generate.engine import GenerateRequest, generate

    width, height = _size(args.size) if args.size else (None, None)
    req = GenerateRequest(model=args.model, prompt=args.prompt, negative=args.negative, steps=args.steps,
                          cfg=args.cfg, width=width, height=height, seed=args.seed, sampler=args.sampler,
                          clip_skip=args.clip_skip, batch=args.batch, adapters=[_lora_arg(x) for x in args.lora],
                          embeddings=args.embedding, out_file=args.out, device=args.device)

    def progress(step, total):
        print(f"\rstep {step}/{total}", end="", file=sys.stderr, flush=True)

    result = generate(req, callback=progress)
    print(file=sys.stderr)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for path, seed in zip(result.paths, result.seeds):
        print(f"{path}  (seed {seed})")
    return 0
