"""`peftlab eval RUN_DIR|CONFIG.yaml [key=value ...]`: evaluate a trained adapter on the run's eval rows."""

from __future__ import annotations

import argparse
import json
import os

from .errors import CliError
from .options import add_dtype_argument

NAME = "eval"
HELP = "evaluate a trained adapter (loss; accuracy and macro-F1 for classification)"
DESCRIPTION = ("Evaluate the adapter a run produced. Give the run's output folder (it holds run_config.yaml and "
               "adapter/), or a run config plus --adapter. Overrides such as data.eval_file=test.jsonl pick "
               "other rows. --base evaluates the base model with the adapter disabled, for comparison.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR|CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--adapter", help="adapter folder (default: RUN_DIR/adapter, or train.output_dir/adapter)")
    parser.add_argument("--base", action="store_true", help="also evaluate with the adapter disabled")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_dtype_argument(parser, None, "default: the run's model.dtype")


def run(args: argparse.Namespace) -> int:
    from ..io import adapter_files
    from ..train import Trainer, load_run_config

    config_path = os.path.join(args.run, "run_config.yaml") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(config_path):
        raise CliError(f"{args.run!r} is neither a run folder (with run_config.yaml) nor a config file.")
    dtype = [f"model.dtype={args.dtype}"] if args.dtype else []
    run_config = load_run_config(config_path, dtype + list(args.overrides))
    from ..core.method import method_for_config

    method = method_for_config(run_config.method)
    if method.run is not None or run_config.task == "ppo":
        raise CliError(
            f"peftlab eval loads a weight adapter into the training loop's model; a {method.name} run "
            f"({'task ppo' if run_config.task == 'ppo' else 'no gradient training'}) is evaluated by its own run. "
            f"Its results are in {os.path.join(run_config.train.output_dir, 'metrics.jsonl')}; run `peftlab train "
            f"{config_path} data.eval_file=...` to score other rows.")
    adapter = args.adapter or os.path.join(run_config.train.output_dir, "adapter")
    if os.path.isdir(args.run) and not args.adapter:
        adapter = os.path.join(args.run, "adapter")
    trainer = Trainer(run_config, log=lambda *_: None, prepare=False)  # the file holds the prepared adapter
    trainer.peft_model.load_tensors("default", adapter_files.read_weights(adapter), adapter)
    metrics = {"adapter": trainer.evaluate()}
    if args.base:
        with trainer.peft_model.disable_adapter():
            metrics["base"] = trainer.evaluate()
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for which, values in metrics.items():
            print(f"{which}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return 0
