"""`peftlab serve MODEL --adapter NAME=DIR ...`: an OpenAI-compatible server, many adapters mixed in every batch."""

from __future__ import annotations

import argparse
import os

from .errors import CliError
from .options import add_dtype_argument

NAME = "serve"
HELP = "serve a base model and many adapters (mixed in every batch) over an OpenAI-compatible HTTP API"
DESCRIPTION = ("Serve MODEL (a folder, hub id or smollm2) with the adapters given as --adapter NAME=DIR (LoRA, "
               "rsLoRA, DoRA, IA3, VeRA), mixed in every batch. A request's `model` field picks the adapter; the base "
               "model's name means none. MODEL may also be a YAML file with the keys model, adapters ({name: dir}), "
               "host, port, allow_load_from, max_batch, max_queue, max_context, dtype, device; options given on the "
               "command line win. Clients can load adapters at runtime (POST /v1/adapters) only from under the "
               "startup adapter folders and --allow-load-from folders.")

# YAML key -> (argparse dest, default); the defaults live here so a YAML value is used unless the flag was given.
SETTINGS = {"host": "127.0.0.1", "port": 8000, "max_batch": 32, "max_queue": 256, "max_context": None,
            "dtype": "fp32", "device": None, "served_model_name": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL|CONFIG.yaml")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter folder served under NAME (repeat for more)")
    parser.add_argument("--allow-load-from", action="append", default=[], metavar="DIR",
                        help="a folder POST /v1/adapters may load from (besides the startup adapters' folders)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=None, help="rows decoded together at most (default 32)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests waiting for a row at most; more get 429 (default 256)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="prompt + completion tokens at most (default: the model's max_position_embeddings)")
    parser.add_argument("--served-model-name", default=None,
                        help="the base model's name in the API (default: MODEL's last path part)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dtype_argument(parser, None, "default fp32")


def _parse_adapters(items: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise CliError(f"--adapter {item!r} is not NAME=DIR; write e.g. --adapter sql=out/sql/adapter.")
        if name in adapters:
            raise CliError(f"--adapter name {name!r} is given twice; give each adapter its own name.")
        if not os.path.isdir(folder):
            raise CliError(f"--adapter {name}={folder}: no such folder. Pass the folder holding adapter_config.json.")
        adapters[name] = folder
    return adapters


def settings(args: argparse.Namespace) -> dict:
    """The server's settings from MODEL (or its YAML file) and the flags; flags win over the file."""
    values: dict = {}
    if args.model.endswith((".yaml", ".yml")):
        from ..io.yaml_file import read_yaml_mapping

        data = read_yaml_mapping(args.model, "serve config")
        known = {"model", "adapters", "allow_load_from", *SETTINGS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CliError(f"serve config {args.model}: unknown keys {unknown}; known: {sorted(known)}.")
        if not isinstance(data.get("adapters", {}), dict):
            raise CliError(f"serve config {args.model}: 'adapters' must map names to folders, e.g. {{sql: out/sql}}.")
        values = dict(data)
        if "model" not in values:
            raise CliError(f"serve config {args.model} has no 'model' key; add e.g. `model: smollm2`.")
    else:
        values["model"] = args.model
    adapters = {str(k): str(v) for k, v in values.get("adapters", {}).items()}
    adapters.update(_parse_adapters(args.adapter))
    _parse_adapters([f"{k}={v}" for k, v in adapters.items()])  # the same checks for the file's entries
    out = {"model": str(values["model"]), "adapters": adapters,
           "allow_load_from": list(values.get("allow_load_from") or []) + args.allow_load_from}
    for key, default in SETTINGS.items():
        flag = getattr(args, key)
        out[key] = flag if flag is not None else values.get(key, default)
    for folder in out["allow_load_from"]:
        if not os.path.isdir(folder):
            raise CliError(f"--allow-load-from {folder}: no such folder.")
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..serve import build_app

    s = settings(args)
    device = s["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    app, engine = build_app(s["model"], s["adapters"], s["allow_load_from"], max_batch=s["max_batch"],
                            max_queue=s["max_queue"], max_context=s["max_context"], dtype=s["dtype"], device=device,
                            served_name=s["served_model_name"])
    names = ", ".join(engine.adapter_names) or "none"
    print(f"peftlab serve: {s['model']} on {device} with adapters: {names}; http://{s['host']}:{s['port']}/v1")
    uvicorn.run(app, host=s["host"], port=int(s["port"]), log_level="info")
    return 0
