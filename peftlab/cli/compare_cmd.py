"""`peftlab compare [CONFIG.yaml] [key=value ...]`: several methods, same task, data and budget; one table.

With no CONFIG it runs the shipped comparison (peftlab/configs/compare_default.yaml): eleven methods, from
in-context learning to full fine-tuning, on SmolLM2-135M-Instruct + Rotten Tomatoes movie reviews.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .errors import CliError
from .options import add_dtype_argument

NAME = "compare"
HELP = "run several methods on one task with the same data and budget; write a table and plots"
DESCRIPTION = ("Run every method listed under `methods:` in CONFIG (shared model/task/data/train sections, same "
               "schema as `peftlab train`), each in its own process, and write results.md, results.csv (scores with "
               "95% intervals over the eval rows, beside chance, majority-class and base-model rows), "
               "score_vs_params.png, loss_curves.png and score_vs_cost.png to train.output_dir/report/. key=value "
               "overrides change the shared sections (e.g. data.max_train_rows=200). --seeds N (or seeds: N in the "
               "config) runs each method with N training seeds. Results stored with the same settings are reused "
               "per (method, seed), so an interrupted compare continues; --rerun redoes them. The whole config is "
               "checked before anything runs. Format and output: docs/compare.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="compare config (default: the shipped eleven-method comparison on movie reviews)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the shared sections, e.g. train.max_steps=20")
    parser.add_argument("--only", metavar="LABEL[,LABEL...]",
                        help="run only these methods (labels from the config, comma-separated); the table still "
                             "lists every method, with stored results where they exist")
    parser.add_argument("--rerun", action="store_true", help="run the selected methods again even if a result exists")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and print what would run (and what would be reused), then exit")
    add_dtype_argument(parser, None, "default: the config's model.dtype (same as the override model.dtype=...)")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="run each method with N training seeds (default: the config's seeds:, else 1); the "
                             "table shows mean and spread, each (method, seed) result is stored and reused")
    parser.add_argument("--echo", action="store_true",
                        help="also stream each worker's output (progress bar, logs) to the terminal")


def run(args: argparse.Namespace) -> int:
    from ..compare import load_compare_config, run_compare
    from ..compare.config import entry_summary
    from ..compare.runner import plan
    from .train_cmd import split_config_and_overrides

    config_path, overrides = split_config_and_overrides(args)
    if config_path is not None:
        from ..io.yaml_file import read_yaml_mapping

        read_yaml_mapping(config_path, "compare config")  # answered before torch is imported
    overrides = ([f"model.dtype={args.dtype}"] if args.dtype else []) + list(overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")  # checked with the config (a whole number >= 1)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if args.only is not None and not only:
        raise CliError("--only needs at least one label, e.g. --only lora,dora.")
    config = load_compare_config(config_path, overrides)  # every entry checked: nothing runs on a bad config
    selected = config.select(only)
    if args.dry_run:
        print(f"{config.source}: {len(config.entries)} methods -> {config.output_dir}")
        states: dict[str, list[str]] = {}
        for item, result, why in plan(config, selected, args.rerun):
            state = f"reuse stored result ({result.get('status')})" if result else f"run ({why})"
            states.setdefault(item.label, []).append(state if config.seeds == 1 else f"seed {item.seed}: {state}")
        for entry in config.entries:
            state = "; ".join(states.get(entry.label, ["not selected"]))
            print(f"  {entry.label}: {entry_summary(entry, config.base)}  [{state}]")
        return 0
    command = "peftlab compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"] else ""
    out = run_compare(config, only=only, rerun=args.rerun, echo=args.echo, command=command.strip())
    failed = list(dict.fromkeys(r["label"] for r in out["results"] if r.get("status") == "error"))
    if failed:
        print(f"peftlab compare: {len(failed)} method(s) failed: {', '.join(failed)} (see their logs under "
              f"{config.output_dir}/logs/); the others' results are in the table.", file=sys.stderr)
        return 1  # the table is written; the status tells scripts that not every method finished
    return 0
