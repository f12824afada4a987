"""``studio caption``: check and caption a dataset folder; ``studio check``: only check it;
``studio buckets``: how its images fall into aspect-ratio buckets."""

from __future__ import annotations

CAPTIONER_NAMES = ["template", "blip", "wd14", "florence2"]


def add_cli(sub) -> None:
    p = sub.add_parser("caption", help="check a dataset folder and write .txt captions for its images")
    p.add_argument("dir", help="the dataset folder (images, optional kohya N_name subfolders)")
    p.add_argument("--captioner", choices=CAPTIONER_NAMES, default="template")
    p.add_argument("--trigger", default="", help="trigger word put first in every caption")
    p.add_argument("--class", dest="class_word", default="", help="class word (template captioner)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions (default: skip them)")
    p.add_argument("--model", help="hub id or local folder of the captioning model (default: the usual one)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--threshold", type=float, default=0.35, help="wd14: minimum tag confidence")
    p.set_defaults(func=_caption)

    c = sub.add_parser("check", help="check a dataset folder and list problem files (changes nothing)")
    c.add_argument("dir")
    c.set_defaults(func=_check)

    b = sub.add_parser("buckets", help="show how a dataset's images fall into aspect-ratio buckets")
    b.add_argument("dir")
    b.add_argument("--resolution", type=int, default=512)
    b.add_argument("--step", type=int, default=64)
    b.set_defaults(func=_buckets)


def print_report(ds) -> None:
    print(f"{ds.root}: {len(ds.items)} usable images, {len(ds.errors)} left out, {len(ds.warnings)} warnings")
    for problem in ds.problems:
        try:
            name = problem.path.relative_to(ds.root)
        except ValueError:
            name = problem.path
        print(f"  {problem.severity:7} {name}: {problem.reason}")


def _caption(args) -> int:
    from studio.dataset.captioners import caption_dataset, get_captioner
    from studio.dataset.scan import scan_dataset

    ds = scan_dataset(args.dir)
    print_report(ds)
    captioner = get_captioner(args.captioner, trigger=args.trigger, class_word=args.class_word, model=args.model,
                              device=args.device, threshold=args.threshold)

    def progress(done, total, message):
        print(f"\r  {message}", end="", flush=True)

    report = caption_dataset(ds, captioner, batch_size=args.batch_size, overwrite=args.overwrite, progress=progress)
    print()
    for problem in report.failed:
        print(f"  failed  {problem.path.name}: {problem.reason}")
    print(report.summary())
    return 0


def _check(args) -> int:
    from studio.dataset.scan import scan_dataset

    print_report(scan_dataset(args.dir))
    return 0


def _buckets(args) -> int:
    from studio.dataset.buckets import bucket_histogram
    from studio.dataset.scan import scan_dataset

    ds = scan_dataset(args.dir)
    hist = bucket_histogram([i.size for i in ds.items], args.resolution, args.step)
    widest = max(hist.values(), default=1)
    for (w, h), n in hist.items():
        print(f"{w:5}x{h:<5} {n:5}  {'#' * max(1, round(40 * n / widest))}")
    return 0
