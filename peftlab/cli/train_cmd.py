"""`peftlab train [CONFIG.yaml] [key=value ...]`: fine-tune with any registered method.

With no CONFIG it runs the shipped default (peftlab/configs/default.yaml): SmolLM2-135M-Instruct + LoRA on
Rotten Tomatoes movie reviews, then prints accuracy and loss before and after training.
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "fine-tune a model with an adapter (no CONFIG: the shipped SmolLM2 + movie-reviews default)"
DESCRIPTION = ("Train an adapter as a YAML run config describes (model, task, method, data, train), with "
               "key=value overrides such as train.lr=1e-4 method.r=8. `--help-config` lists every option.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="run config (default: the shipped SmolLM2 + movie reviews run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in train.output_dir/checkpoints")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in train.output_dir (its metrics, checkpoints and adapter)")
    parser.add_argument("--help-config", action="store_true", help="list every config option with its doc and exit")


def split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell `peftlab train lr=1` (no config) from a config path: an '=' decides."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        return None, [config] + overrides
    return config, overrides


def run(args: argparse.Namespace) -> int:
    from ..train.config import describe_options, load_run_config

    config, overrides = split_config_and_overrides(args)
    if args.help_config:
        print(describe_options())
        return 0
    run_config = load_run_config(config, overrides)  # torch-free: a bad file, key or value is answered at once
    from ..train import format_before_after, train
    print(f"peftlab train: {run_config.method_name} on {run_config.model}, task {run_config.task}, "
          f"data {run_config.data.train_file if run_config.data else 'ppo.prompts'} -> {run_config.train.output_dir}")
    result = train(run_config, resume=args.resume, overwrite=args.overwrite)
    print()
    print(format_before_after(result))
    print(f"\n{result['steps']} steps in {result['train_seconds']:.0f} s ({result['tokens_per_s']:.0f} tokens/s); "
          f"adapter saved to {result['adapter_dir']}")
    return 0
