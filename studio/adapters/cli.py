"""``python -m studio inspect FILE [--json] [--deep]``: what an adapter / embedding file is."""

from __future__ import annotations


def add_cli(sub) -> None:
    p = sub.add_parser("inspect", help="kind, family, ranks, metadata and warnings of an adapter or embedding file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--deep", action="store_true",
                   help="also read every tensor: NaN/Inf check, per-block delta norms, real sshs hash")
    p.set_defaults(func=_inspect)


def _inspect(args) -> int:
    import json

    from studio.adapters.inspect import format_report, inspect_file

    report = inspect_file(args.file, deep=args.deep)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
