"""``studio models``: list the base models the studio can see; ``studio model-info``: what one is."""

from __future__ import annotations

import json


def add_cli(sub) -> None:
    p = sub.add_parser("models", help="list base models found (webUI folders, HF cache, workspace)")
    p.add_argument("--models-dir", action="append", default=[], help="extra checkpoint folder (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    q = sub.add_parser("model-info", help="family and layout of a base model (file, folder or hub id)")
    q.add_argument("model")
    q.set_defaults(func=_info)


def _list(args) -> int:
    from studio.models.discovery import discover_models

    entries = discover_models(extra_dirs=args.models_dir)
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=2))
    else:
        for e in entries:
            print(f"{e.family or '?':6} {e.kind:11} {e.label}\n       {e.spec}")
    return 0


def _info(args) -> int:
    from studio.models.loader import detect_family, resolve

    src = resolve(args.model)
    print(json.dumps({"spec": src.spec, "kind": src.kind, "family": detect_family(args.model)}, indent=2))
    return 0
