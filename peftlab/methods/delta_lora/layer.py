"""Delta-LoRA's layer: a LoRA linear layer (nn.Linear, or Conv1D with its (in, out) weight) that also remembers
the previous step's A (r, in) and B (out, r) of each adapter, so the method's `on_step` hook can add the change of
the product s B A to the base weight. Storing A and B costs r (in + out) numbers per layer; the previous product
itself would cost out x in.
"""

from __future__ import annotations

import torch

from ..lora.layer import LoraLinear
from .config import DeltaLoraConfig


class DeltaLoraLinear(LoraLinear):
    """LoRA on a linear layer, plus the reference (A, B) of the last optimizer step per adapter."""

    adapter_containers = LoraLinear.adapter_containers + ("delta_prev",)

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        # adapter -> (A, B) as they were after the previous optimizer step (detached copies, not parameters:
        # they neither train nor go into state dicts; `remember` refreshes them).
        self.delta_prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_adapter(self, adapter_name: str, config: DeltaLoraConfig, module_name: str) -> None:
        super().add_adapter(adapter_name, config, module_name)
        weight = self.base_layer.weight
        if weight.dtype in (torch.bfloat16, torch.float16):
            # The base weight trains (step_base_weight adds each step's change): fp32 master copy, as for every
            # trained tensor, whatever dtype the base was loaded in; a bf16 W would round the small changes away.
            weight.data = weight.data.to(torch.float32)
        self.remember(adapter_name)

    @torch.no_grad()
    def remember(self, adapter_name: str) -> None:
        """Take the current A and B as the reference for the next step's change."""
        A, B = self.lora_pair(adapter_name)
        self.delta_prev[adapter_name] = (A.detach().clone(), B.detach().clone())

    def product(self, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """s B A in the base weight's layout: (out, in), or (in, out) for Conv1D; like `delta_weight` but for any
        (A, B)."""
        delta = (B @ A) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def step_base_weight(self, adapter_name: str, ratio: float) -> None:
        """W <- W + ratio * (s B_t A_t - s B_{t-1} A_{t-1}) (fp32 arithmetic, cast back), then remember (A_t, B_t)."""
        A, B = self.lora_pair(adapter_name)
        A_prev, B_prev = (t.to(A.device) for t in self.delta_prev[adapter_name])
        change = self.product(adapter_name, A, B) - self.product(adapter_name, A_prev, B_prev)
        weight = self.base_layer.weight
        weight.data.copy_((weight.data.to(torch.float32) + ratio * change.to(torch.float32)).to(weight.dtype))
        self.remember(adapter_name)
