"""`peftlab methods`: the registered fine-tuning methods, one line each."""

from __future__ import annotations

import argparse
import json

NAME = "methods"
HELP = "list the registered methods (name, peft_type, summary)"
DESCRIPTION = ("List every registered method, one line each: the name you pick it by, the peft_type written to "
               "adapter_config.json, and a one-line summary.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")


def describe() -> list[dict]:
    from ..core.method import registered_methods

    return [{"name": m.name, "peft_type": m.config_cls.peft_type, "config": m.config_cls.__name__,
             "summary": m.summary, "wraps": m.supported_types()} for m in registered_methods()]


def run(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    name_w = max((len(r["name"]) for r in rows), default=4)
    type_w = max((len(r["peft_type"]) for r in rows), default=9)
    for r in rows:
        print(f"{r['name']:<{name_w}}  {r['peft_type']:<{type_w}}  {r['summary']}".rstrip())
    return 0
