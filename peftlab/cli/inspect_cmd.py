"""`peftlab inspect MODEL`: what to put in target_modules.

Only the config is read; the model is built on the meta device (shapes, no memory, no weights), so a model
of any size is inspected in about a second.
"""

from __future__ import annotations

import argparse
import json
import os

from .errors import CliError

NAME = "inspect"
HELP = "show a model's linear layers and which target_modules to use"
DESCRIPTION = (
    "Show a model's linear-like layers grouped by name pattern (count, shape, parameters), its output head "
    "(which target_modules='all-linear' leaves out), the method's default target_modules for this model type, "
    "and a ready LoraConfig line. Reads only the config: no weights are loaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a local model folder, a Hugging Face hub id, or a shipped model name (smollm2)")
    parser.add_argument("--method", default="lora",
                        help="method whose default target_modules to show (default: lora; see `peftlab methods`)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose code lives in its hub repo (runs that code)")


def build_on_meta(config, trust_remote_code: bool = False):
    """Build the model a config describes on the meta device: the class its `architectures` names if
    transformers has it, else the first auto class that supports it (causal LM, seq2seq LM, bare model)."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    tried: list[str] = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                return cls(config)
        except Exception as err:  # noqa: BLE001 - fall back to the auto classes
            tried.append(f"{arch}: {type(err).__name__}: {err}")
    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as err:  # "Unrecognized configuration class ... for this kind of AutoModel"
            tried.append(f"{auto.__name__}: {' '.join(str(err).split())[:160]}")
    raise CliError(
        f"transformers cannot build a model for model_type={getattr(config, 'model_type', None)!r} "
        f"(tried: {'; '.join(tried)}). If its code lives in its hub repo, add --trust-remote-code."
    )


def _shape(module) -> list[int]:
    """(out, in) of a linear-like module; GPT-2's Conv1D stores its weight as (in, out)."""
    from ..core.targets import Conv1D

    w = module.weight
    if isinstance(module, Conv1D):
        return [int(w.shape[1]), int(w.shape[0])]
    return [int(w.shape[0]), int(w.shape[1])]


def inspect_model(model_ref: str, method_name: str = "lora", trust_remote_code: bool = False) -> dict:
    """Everything `peftlab inspect` prints, as a dict (the --json output)."""
    from ..core.method import get_method
    from ..core.targets import ALL_LINEAR, candidate_names, group_by_pattern, matches, output_head_names
    from ..models import load_config

    try:
        method = get_method(method_name)
    except KeyError as err:
        raise CliError(err.args[0]) from None
    _quiet_transformers()
    config = load_config(model_ref, trust_remote_code=trust_remote_code)
    model = build_on_meta(config, trust_remote_code=trust_remote_code)
    model_type = getattr(config, "model_type", None)

    names = candidate_names(model)
    heads = output_head_names(model)
    modules = dict(model.named_modules())
    input_emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    defaults = method.default_targets.get(model_type) if model_type is not None else None

    groups = []
    for pattern, members in group_by_pattern(names).items():
        shapes = [_shape(modules[n]) for n in members]
        distinct = [list(s) for s in dict.fromkeys(tuple(s) for s in shapes)]
        params = sum(p.numel() for n in members for p in modules[n].parameters(recurse=False))
        is_head = any(n in heads for n in members)
        tied = is_head and input_emb is not None and any(
            getattr(modules[n], "weight", None) is getattr(input_emb, "weight", False) for n in members)
        groups.append({
            "pattern": pattern,
            "leaf": pattern.rsplit(".", 1)[-1],
            "count": len(members),
            "shape": distinct[0] if len(distinct) == 1 else None,
            "shapes": distinct,
            "params": params,
            "type": type(modules[members[0]]).__name__,
            "output_head": is_head,
            "tied_to_input_embeddings": tied,
            "in_all_linear": not is_head,
            "in_default_targets": bool(defaults) and all(matches(n, defaults) for n in members),
        })

    default_hits = sum(1 for n in names if defaults and matches(n, defaults)) if defaults else 0
    suggestion = list(defaults) if defaults and default_hits else _leafs([g for g in groups if g["in_all_linear"]])
    cfg_name = method.config_cls.__name__
    extra = "r=16, lora_alpha=32, " if method.name == "lora" else ""
    return {
        "model": model_ref,
        "resolved": _resolved(model_ref),
        "model_type": model_type,
        "architecture": type(model).__name__,
        "total_params": sum(p.numel() for p in model.parameters()),
        "linear_modules": len(names),
        "groups": groups,
        "output_head": sorted(heads),
        "method": method.name,
        "default_target_modules": list(defaults) if defaults else None,
        "default_target_matches": default_hits,
        "all_linear_matches": sum(1 for n in names if n not in heads),
        "example": f"{cfg_name}({extra}target_modules={json.dumps(suggestion)})",
        "example_all_linear": f"{cfg_name}({extra}target_modules={json.dumps(ALL_LINEAR)})",
    }


def _resolved(model_ref: str) -> str:
    """Where the config was read: the converted folder or GGUF file of a shipped model, a local folder's
    absolute path, or the hub id as given."""
    from ..models import SHIPPED_MODELS, cached_shipped_path, shipped_gguf

    if model_ref in SHIPPED_MODELS:
        return cached_shipped_path(model_ref) or os.path.join(*shipped_gguf(model_ref))
    path = os.path.expanduser(model_ref)
    return os.path.abspath(path) if os.path.isdir(path) else model_ref


def _leafs(groups: list[dict]) -> list[str]:
    return list(dict.fromkeys(g["leaf"] for g in groups))


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieter output is a nicety
        pass


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_report(info: dict) -> str:
    lines = [
        f"model:        {info['model']}" + (f"  ({info['resolved']})" if info["resolved"] != info["model"] else ""),
        f"model type:   {info['model_type']}  (built {info['architecture']} on the meta device; no weights read)",
        f"total params: {info['total_params']:,} ({_human(info['total_params'])})",
        "",
        f"Linear-like modules: {info['linear_modules']} in {len(info['groups'])} groups",
    ]
    rows = [("pattern", "count", "shape (out x in)", "params", "")]
    for g in info["groups"]:
        shape = (f"{g['shape'][0]} x {g['shape'][1]}" if g["shape"] is not None
                 else ", ".join(f"{o}x{i}" for o, i in g["shapes"]))
        notes = []
        if g["in_default_targets"]:
            notes.append("default target")
        if g["output_head"]:
            notes.append("output head" + (", tied to input embeddings" if g["tied_to_input_embeddings"] else ""))
        if g["type"] != "Linear":
            notes.append(g["type"])
        rows.append((g["pattern"], str(g["count"]), shape, f"{g['params']:,}", "; ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        line = f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}"
        lines.append((line + (f"  [{r[4]}]" if r[4] else "")).rstrip())
    lines.append("")
    if info["output_head"]:
        lines.append(f"Output head: {', '.join(info['output_head'])} (left out by target_modules=\"all-linear\", "
                     f"which matches the other {info['all_linear_matches']} modules)")
    else:
        lines.append(f"Output head: none found (target_modules=\"all-linear\" matches all "
                     f"{info['all_linear_matches']} modules)")
    method, mtype = info["method"], info["model_type"]
    if info["default_target_modules"]:
        hits = info["default_target_matches"]
        lines.append(f"Default {method} target_modules for model_type {mtype!r}: "
                     f"{json.dumps(info['default_target_modules'])} ({hits} modules)"
                     + ("" if hits else " -- but they match no module here: set target_modules yourself"))
    else:
        lines.append(f"Default {method} target_modules for model_type {mtype!r}: none; a config without "
                     f"target_modules fails on this model, so set them, e.g. as below")
    lines += ["", "Example:", f"  {info['example']}"]
    if info["example_all_linear"]:
        lines.append(f"  {info['example_all_linear']}  # every group above except the output head")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = inspect_model(args.model, method_name=args.method, trust_remote_code=args.trust_remote_code)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
