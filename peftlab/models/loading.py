"""Loading a base model that never holds more than one copy of its weights.

`load_model(name, dtype=..., quantize=...)` builds the model on PyTorch's meta device (parameters take no memory;
buffers are computed on the CPU as the model's own __init__ computes them, e.g. the rotary `inv_freq`), then fills
it tensor by tensor from the checkpoint's safetensors files (one `model.safetensors`, or the shards listed in
`model.safetensors.index.json`), converting each tensor to the target dtype as it is read, or handing it to a
`quantize` builder that turns its module into a 4-bit one (QLoRA). Peak memory is about the loaded model plus the
largest tensor:

    each tensor is read through its own short `safe_open` (a memory map, released with the tensor): a file kept open
    would keep every page read so far in the process's RSS (measured: converting a 460 MB fp32 file to bf16 through
    one open map peaked at 885 MB, 2.0x the 230 MB result; one map per tensor at 488 MB = result + one 46 MB tensor
    + the interpreter's 220 MB). A tensor stored in the target dtype is not copied at all: it stays a copy-on-write
    view of the file, as in transformers' from_pretrained.

After the fill, tied weights are tied (`tie_weights`, which also covers a checkpoint that stores only one side), and
parameters the checkpoint lacks (a new classification head; a head whose size differs, with
`ignore_mismatched_sizes=True`) are initialised by the model's own `initialize_weights`, which leaves every loaded
tensor alone (transformers' `_is_hf_initialized` marks). A checkpoint whose names do not line up with the model's
(older layouts transformers renames while loading, remote code) is loaded by transformers' own `from_pretrained` in
the target dtype instead, with a one-line note; the `quantize` builders then run module by module after it.

Where PEFTLAB_MMAP_THRESHOLD asks for it, loading pins glibc's mmap threshold for the process (`pin_mmap_threshold`):
large freed tensors then go back to the OS at once instead of leaving resident holes in the heap, for less peak memory
at a cost in time (its docstring has both). Off by default.

Checkpoints must be safetensors: a folder with only `pytorch_model.bin` (a pickle, which can run code when read) is
refused with the command that converts it. Hub ids are fetched with huggingface_hub's `snapshot_download`
(safetensors, config and tokenizer files only).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from .dtype import describe, resolve_dtype
from .shipped import DEFAULT_SHIPPED, ModelSourceError, _from_hub, _quiet_hub, resolve_model

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HUB_PATTERNS = ["*.safetensors", INDEX_NAME, "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]

# keyword arguments of from_pretrained that set config fields (everything else is refused, not silently dropped)
CONFIG_KWARGS = ("num_labels", "id2label", "label2id", "pad_token_id", "problem_type")
Builder = Callable[[nn.Module, torch.Tensor], nn.Module]
"""(module still on the meta device, its weight as read, in the target dtype) -> the module to put in its place."""
Quantize = Callable[[nn.Module], dict[str, Builder]]
"""(the model on the meta device) -> {module path: builder}: which modules to replace as their weight is read."""


class CheckpointFormatError(ModelSourceError):
    """The checkpoint is not in a format peftlab reads (only pickled .bin files; no weights at all)."""


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files holding `folder`'s weights, in index order. Refuses pickled checkpoints."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointFormatError(f"{folder!r}: {INDEX_NAME} lists shards that are not there: {missing[:3]}. "
                                        "The download or copy is incomplete; fetch the folder again.")
        return [os.path.join(folder, s) for s in shards]
    if os.path.isfile(os.path.join(folder, SINGLE_NAME)):
        return [os.path.join(folder, SINGLE_NAME)]
    found = sorted(os.listdir(folder))
    pickles = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt")) and "training_args" not in f]
    if pickles:
        raise CheckpointFormatError(
            f"{folder!r} holds its weights as {pickles[0]} (a pickle), not safetensors; peftlab never unpickles weight "
            "files (unpickling can run code). Convert it once, in an environment you trust: python -c \"from "
            f"transformers import AutoModel; AutoModel.from_pretrained('{folder}', use_safetensors=False)"
            f".save_pretrained('{folder.rstrip('/')}-safetensors')\" (use the model's AutoModelFor... class to keep "
            "its head), then pass the new folder.")
    raise CheckpointFormatError(f"{folder!r} has config.json but no weights ({SINGLE_NAME} or {INDEX_NAME}; found: "
                                f"{found[:10]}). Pass a folder written by save_pretrained.")


def _tensor_names(files: list[str]) -> dict[str, str]:
    """checkpoint key -> the file holding it."""
    from safetensors import safe_open

    where: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as fh:
            where.update(dict.fromkeys(fh.keys(), path))
    return where


def _read(path: str, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor from its own short-lived map (module docstring: why not one open map), converted to `dtype`
    (floating tensors; None: as stored) in one pass. A tensor already in `dtype` stays a copy-on-write view of the
    file, as transformers keeps it: nothing is read until it is used, and its pages are the page cache's."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        tensor = fh.get_tensor(key)
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)  # the copy; the map goes with `tensor`
    return tensor


@functools.cache
def _libc(name: str):
    """glibc's function `name` (malloc_trim, mallopt), or None elsewhere (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the OS. Each tensor read (and each quantisation's fp32 scratch) is freed at once,
    but glibc keeps most freed chunks of up to 32 MB in its heap, where they count as resident: measured on a 4-block
    TinyLlama-shaped model quantised at load, 364 MB resident beyond the 334 MB of loaded tensors, gone after a
    trim."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20
"""A threshold that gives the memory back (1 MiB): blocks of at least this many bytes get their own memory map,
returned to the OS when freed. `PEFTLAB_MMAP_THRESHOLD=1048576` asks for it; not the default (`pin_mmap_threshold`)."""


def pin_mmap_threshold(size: int | None = None) -> bool:
    """Make glibc give every freed block of >= `size` bytes back to the OS at once (mallopt M_MMAP_THRESHOLD), for
    this whole process; False where there is no glibc, or where not asked. `size` defaults to the environment variable
    PEFTLAB_MMAP_THRESHOLD (bytes, e.g. 1048576 = MMAP_THRESHOLD); unset or 0: glibc's own behaviour (the default).

    What it trades: glibc starts at 128 KiB but raises its threshold to the size of each mapped block freed, up to
    32 MiB, after which transient tensors come from the heap and the holes they leave between the activations kept
    for backward stay resident. Pinned low, they go back to the OS, but every large tensor then maps and zeroes fresh
    pages. Measured on a quiet 2-core CPU (8-layer Llama of a 1.1B's width, LoRA r16 all-linear, one training step on
    1 x 256 tokens under bf16 autocast, steady state): a bf16 base took 1.40 s and peaked 0.38 GB above its start
    unpinned, 1.79 s and 0.27 GB pinned at 1 MiB; QLoRA (whose dequantised weights now reuse buffers: kernels/nf4.py
    `dequantize_nf4_scratch`) 2.26 s / 0.39 GB unpinned, 2.69 s / 0.27 GB pinned. Before those buffers, the pin was the
    default and cost QLoRA's step 2.2x (5.20 s against 2.37 s) for 0.31 GB: hence off by default, for where memory
    matters more than time. docs/benchmarks.md has the 1.1B figures."""
    if size is None:
        raw = os.environ.get("PEFTLAB_MMAP_THRESHOLD", "0")
        if not raw.strip().isdigit():
            raise ValueError(f"PEFTLAB_MMAP_THRESHOLD must be a whole number of bytes (e.g. 1048576 pins the threshold "
                             f"at 1 MiB; 0 leaves glibc's own); got {raw!r}. Fix or unset it.")
        size = int(raw)
    mallopt = _libc("mallopt")
    return bool(size > 0 and mallopt is not None and mallopt(M_MMAP_THRESHOLD, size))


def _model_key(key: str, expected: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint key `key`: the same, or with the base model prefix added or dropped (a causal
    LM checkpoint read into AutoModel, or a bare base checkpoint read into a model with a head); None if neither."""
    if key in expected:
        return key
    if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    return None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
        owner._parameters[leaf]._is_hf_initialized = True
    else:  # a persistent buffer (e.g. a position_ids table): keep the dtype the model built it in
        buffer = owner._buffers[leaf]
        owner._buffers[leaf] = value.to(buffer.dtype if buffer is not None else value.dtype)
        owner._buffers[leaf]._is_hf_initialized = True


def load_model(name_or_path: str | os.PathLike = DEFAULT_SHIPPED, auto_class=None, dtype="fp32",
               quantize: Quantize | None = None, log: Callable[[str], None] | None = None, **kwargs):
    """Load a pretrained model (a shipped name such as "smollm2", a local folder, or an HF hub id) with its frozen
    weights in `dtype`, streamed into place (module docstring).

    dtype: "auto" (bf16 where the hardware computes it natively, else fp32), "bf16", "fp16", "fp32" (the default,
    as before this option existed) or a torch dtype; an unusable one raises before any weight is read
    (peftlab.models.dtype). quantize: modules to rebuild from their weight as it is read (QLoRA's 4-bit layers:
    get_method("qlora").quantize_at_load(config) gives one). log: called with the line saying which dtype the base got
    and why (e.g. print). `auto_class` defaults to AutoModelForCausalLM; kwargs: config fields (num_labels, id2label,
    label2id, ...), ignore_mismatched_sizes, trust_remote_code. Side effect, only where PEFTLAB_MMAP_THRESHOLD is set:
    glibc's mmap threshold is pinned for the process (`pin_mmap_threshold`)."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    kwargs = dict(kwargs)
    target, why = resolve_dtype(dtype)
    if log is not None:
        log(describe(target, why, quantised=quantize is not None))
    ignore_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
    trust = bool(kwargs.pop("trust_remote_code", False))
    unknown = sorted(set(kwargs) - set(CONFIG_KWARGS))
    if unknown:
        raise TypeError(f"load_model got unexpected keyword arguments {unknown}; it accepts dtype, quantize, log, "
                        f"ignore_mismatched_sizes, trust_remote_code and config fields ({', '.join(CONFIG_KWARGS)}).")
    folder = local_folder(name_or_path)
    files = checkpoint_files(folder)  # before building anything: a pickle-only folder fails here
    pin_mmap_threshold()  # PEFTLAB_MMAP_THRESHOLD: large freed tensors go back to the OS (off unless asked)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust, **kwargs)
    model = _build_on_meta(auto_class, config, trust)
    builders = quantize(model) if quantize is not None else {}
    loaded = _fill(model, files, target, builders, ignore_mismatched)
    if loaded is None:  # names do not line up: transformers' own loader (one copy too, in the target dtype)
        print(f"peftlab: the checkpoint's tensor names in {folder} do not match {type(model).__name__}'s; loading it "
              "with transformers' from_pretrained instead", file=sys.stderr)
        del model
        model = auto_class.from_pretrained(folder, dtype=target, trust_remote_code=trust,
                                           ignore_mismatched_sizes=ignore_mismatched, **kwargs)
        for path, build in (quantize(model) if quantize is not None else {}).items():
            module = model.get_submodule(path)
            _replace(model, path, build(module, module.weight.detach()))
    _finish(model, folder, target)
    return model


def local_folder(name_or_path: str | os.PathLike) -> str:
    """A folder holding the model's config and safetensors: the shipped model's converted folder, a local folder
    (checked), or a hub id's snapshot (fetched with huggingface_hub, local cache first)."""
    path = resolve_model(name_or_path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    _quiet_hub()
    return _from_hub(lambda repo, **kw: snapshot_download(repo, allow_patterns=HUB_PATTERNS, **kw), path)


def _build_on_meta(auto_class, config, trust: bool) -> nn.Module:
    """The model with every parameter on the meta device and every buffer computed on the CPU (in fp32)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return auto_class.from_config(config, trust_remote_code=trust)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _fill(model: nn.Module, files: list[str], dtype: torch.dtype, builders: dict[str, Builder],
          ignore_mismatched: bool) -> bool | None:
    """Read every checkpoint tensor into `model` (module docstring). None when the names do not line up (nothing is
    read: the caller loads another way)."""
    expected = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") or ""
    where = _tensor_names(files)
    plan = {k: _model_key(k, set(expected), prefix) for k in where}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    found = {v for v in plan.values() if v is not None}
    # A base-model parameter the checkpoint lacks (not a tied one, not a new task head's) means another naming scheme:
    # the caller falls back to transformers' loader, which knows the renames.
    base_missing = [k for k in expected if k not in found and k not in tied and _is_param(model, k)
                    and (not prefix or k.startswith(f"{prefix}.") or not hasattr(model, prefix))]
    if base_missing:
        return None
    for key, name in plan.items():
        if name is None:
            continue  # e.g. lm_head.weight read into a model with a classification head
        tensor = _read(where[key], key, dtype if _is_param(model, name) else None)
        current = expected[name]
        if tuple(tensor.shape) != tuple(current.shape):
            if ignore_mismatched:
                continue  # left on meta: initialised below like a missing tensor
            raise ModelSourceError(f"Checkpoint tensor {key!r} has shape {tuple(tensor.shape)} but the model's "
                                   f"{name!r} is {tuple(current.shape)}; pass ignore_mismatched_sizes=True to start it "
                                   "afresh.")
        owner, _, leaf = name.rpartition(".")
        built = leaf == "weight" and owner in builders
        if built:
            _replace(model, owner, builders[owner](model.get_submodule(owner), tensor))
        else:
            _set_tensor(model, name, tensor)
        del tensor
        if built:
            _give_back_freed_memory()  # the quantisation's scratch (a few fp32 copies of the weight)
    _give_back_freed_memory()
    missing = {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    model.tie_weights(missing_keys=missing)
    _initialise_missing(model, dtype)
    return True


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(owner)._parameters


def _initialise_missing(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters still on the meta device after loading and tying (a new head): materialised in `dtype` and
    initialised by the model's own rule; loaded tensors carry `_is_hf_initialized` and are skipped."""
    fresh: set[int] = set()
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="cpu", dtype=dtype),
                                                        requires_grad=param.requires_grad)
                fresh.add(id(module))
    if fresh:
        # initialize_weights skips modules marked initialised (from_config marked them all when it built the model)
        for module in model.modules():
            module._is_hf_initialized = id(module) not in fresh
        with torch.no_grad():
            model.initialize_weights()
        model.tie_weights()


def _finish(model: nn.Module, folder: str, dtype: torch.dtype) -> None:
    """What from_pretrained does after the weights: dtype in the config, generation defaults, eval mode."""
    model.config.dtype = dtype
    model.config._name_or_path = folder
    generation = os.path.join(folder, "generation_config.json")
    if getattr(model, "can_generate", lambda: False)() and os.path.isfile(generation):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()


__all__ = ["load_model", "local_folder", "checkpoint_files", "CheckpointFormatError", "Quantize", "Builder"]
