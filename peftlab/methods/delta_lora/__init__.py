"""Delta-LoRA (Zi et al., 2023): LoRA that also moves the base weight by the change of the low-rank product.

Shapes as in LoRA: W (out, in) (Conv1D stores it (in, out)), A (r, in), B (out, r), s = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA). Forward, as LoRA without dropout on the adapter branch:
    y = W_t x + s B_t A_t x
After optimizer step t (t = 1, 2, ... counts completed steps; the training loop calls the `on_step` hook then):
    t <= K:  W_t = W_{t-1}                                   (warm-up, K = update_start_step)
    t >  K:  W_t = W_{t-1} + lambda * s (B_t A_t - B_{t-1} A_{t-1})
so after k > K steps W_k = W_0 + lambda * sum_{t=K+1..k} s (B_t A_t - B_{t-1} A_{t-1}) = W_0 + lambda * s (B_k A_k -
B_K A_K): the base follows the adapter's own movement since the warm-up, scaled by lambda (`delta_lambda`). The
paper's Algorithm 1 writes the same update with a 0-based iteration index ("if t > K"); here step K + 1 is the first
that moves W. W gets no gradient and no optimizer state: only A_{t-1}, B_{t-1} are kept (detached copies, r (in +
out) numbers per layer), not the (out, in) product. The paper also removes dropout from the adapter branch (so that
the gradient of B A is the one W would get); `lora_dropout` must be 0.

Merging gives W_t + s B_t A_t (core's merge of `delta_weight` into the updated W). `disable_adapter()` and
`unload()` give the updated W_t, not the pretrained W_0: the base model itself has been fine-tuned. Keep the base
weights in fp32 while training (peftlab's loop does): in bf16 most per-step changes are below W's rounding step and
are lost.

Files. The base weight changes, so the adapter folder carries it: adapter_model.safetensors holds PEFT's LoRA
tensors (`<path>.lora_A.weight`, `<path>.lora_B.weight`) plus the updated base weight of every adapted layer
under `base_model.model.<path>.base_layer.weight` (its state-dict name in a PEFT model), and adapter_config.json is
a LORA config plus `delta_lambda` and `update_start_step`. So the folder is self-contained:
- peftlab's `PeftModel.from_pretrained(base, folder)` builds the Delta-LoRA adapter, copies W_t into the base
  layers (in place: the base model object passed in is changed) and A, B into the adapter: the trained model,
  exactly. It also takes the loaded A, B as the previous step's, so training on with is_trainable=True (or
  `peftlab train --resume`) continues the base update exactly.
- HF PEFT's `PeftModel.from_pretrained` reads it as LoRA (ignoring the two extra config keys, with a warning) and
  loads the `base_layer.weight` entries into its base layers as well (it loads every file key that names a
  parameter of the wrapped model), so PEFT reproduces the trained model too.
- Tools that read only the LoRA tensors (e.g. vLLM's LoRA serving) would pair them with the original W_0 and get a
  different model: serve `merge_and_unload()`'s model instead.
The cost is the full base weight of each adapted layer in the file (SmolLM2-135M, q_proj and v_proj of 30 layers:
30 x (576 x 576 + 192 x 576) x 4 bytes = 53 MB in fp32).
"""

from __future__ import annotations

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from ...io.adapter_files import KEY_PREFIX, AdapterFileError
from .config import DeltaLoraConfig
from .layer import DeltaLoraLinear


def _layers(model, adapter_name: str) -> list[tuple[str, DeltaLoraLinear]]:
    return [(path, layer) for path, layer in model.adapter_layers()
            if isinstance(layer, DeltaLoraLinear) and adapter_name in layer.adapter_names]


def _base_key(path: str) -> str:
    return f"{KEY_PREFIX}{path}.base_layer.weight"


def update_base_weights(model, adapter_name: str, step: int) -> None:
    """The `on_step` hook: past the warm-up, W += lambda * (change of s B A); always remember this step's A, B."""
    config = model.peft_config[adapter_name]
    if config.inference_mode:  # a frozen adapter does not train: neither does its base
        return
    for _, layer in _layers(model, adapter_name):
        if step > config.update_start_step:
            layer.step_base_weight(adapter_name, config.delta_lambda)
        else:
            layer.remember(adapter_name)


def add_base_weights(model, adapter_name: str, tensors: dict) -> dict:
    """`to_file`: the adapted layers' (updated) base weights go into the file beside A and B."""
    out = dict(tensors)
    for path, layer in _layers(model, adapter_name):
        if layer.merged_adapters:
            raise ValueError(
                f"{path} has adapters {layer.merged_adapters} merged into its base weight; a Delta-LoRA file stores "
                "the base weight itself, which would then hold the adapter's update twice. Call "
                "model.unmerge_adapter() before save_pretrained."
            )
        out[_base_key(path)] = layer.base_layer.weight
    return out


def base_weight_targets(model, adapter_name: str, found: dict) -> dict:
    """`load_targets`: the file's base weights are copied into the adapted layers' base weights."""
    targets = {_base_key(path): layer.base_layer.weight for path, layer in _layers(model, adapter_name)}
    if targets and not any(k in found for k in targets):
        raise AdapterFileError(
            f"This Delta-LoRA adapter file has no base weights (expected e.g. {next(iter(targets))!r}); Delta-LoRA "
            "fine-tunes the base weights too, so its A and B alone do not give the trained model. Load a folder "
            "written by save_pretrained of a delta_lora model, or load a plain LoRA file with LoraConfig (remove "
            "delta_lambda and update_start_step from its adapter_config.json)."
        )
    return targets


def remember_loaded(model, adapter_name: str) -> None:
    """`after_load`: the loaded A, B are the reference for the next step's change."""
    for _, layer in _layers(model, adapter_name):
        layer.remember(adapter_name)


METHOD = register(Method(
    name="delta_lora",
    config_cls=DeltaLoraConfig,
    layers=((nn.Linear, DeltaLoraLinear), (Conv1D, DeltaLoraLinear)),
    summary="LoRA that also adds lambda x the change of s B A to the base weight after each step (Delta-LoRA)",
    default_targets=ATTENTION_QV_TARGETS,
    on_step=update_base_weights,
    updates_base=True,
    to_file=add_base_weights,
    load_targets=base_weight_targets,
    after_load=remember_loaded,
))

__all__ = ["DeltaLoraConfig", "DeltaLoraLinear", "METHOD"]
