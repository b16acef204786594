"""LoRA+'s optimizer parameter groups (the `param_groups` hook), PEFT's `create_loraplus_optimizer` rules.

With the run's learning rate lr = η_A (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large
Models"): for W + s B A with A (r, in), B (out, r), the stable feature-learning regime at large width needs
η_B = λ η_A with λ >> 1; PEFT's `loraplus_lr_ratio` is λ.

    group "A"          lr                    A of linear/conv layers, and every other 2-D trained tensor
                                             (e.g. a modules_to_save head's weight)
    group "B"          lr * ratio            B of linear/conv layers, and every 1-D trained tensor (trained
                                             biases, a head's bias), as PEFT's `"lora_B" in name or ndim == 1`
    group "embedding"  loraplus_lr_embedding A and B of embedding layers (an absolute lr, PEFT's default 1e-6)

Each group carries a "name" key ("loraplus_A", ...) so that logs and tests can tell them apart; torch
optimizers keep extra keys in a param group untouched.
"""

from __future__ import annotations

from torch import nn

from ..lora.layer import LoraLayer


def loraplus_param_groups(model, adapter_name: str, params: list[tuple[str, nn.Parameter]], lr: float) -> list[dict]:
    config = model.peft_config[adapter_name]
    b_ids: set[int] = set()
    embedding_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.adapter_names:
            A, B = module.lora_pair(adapter_name)
            if module.is_embedding:
                embedding_ids.update((id(A), id(B)))
            else:
                b_ids.add(id(B))
    groups = {"loraplus_A": [], "loraplus_embedding": [], "loraplus_B": []}
    for _, p in params:
        if id(p) in embedding_ids:
            groups["loraplus_embedding"].append(p)
        elif id(p) in b_ids or p.ndim == 1:
            groups["loraplus_B"].append(p)
        else:
            groups["loraplus_A"].append(p)
    rates = {"loraplus_A": lr, "loraplus_embedding": config.loraplus_lr_embedding,
             "loraplus_B": lr * config.loraplus_lr_ratio}
    return [{"params": ps, "lr": rates[name], "name": name} for name, ps in groups.items() if ps]
