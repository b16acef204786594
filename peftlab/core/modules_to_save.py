"""`modules_to_save`: modules trained in full (e.g. a new classifier head), one copy per adapter.

The wrapper keeps the original module (frozen, used when adapters are disabled) and a deep copy per
adapter in `modules_to_save[adapter]`, so parameter names read `score.modules_to_save.default.weight`
as in HF PEFT. In the file the copy's tensors are saved under the original's names
(`base_model.model.score.weight`), which is what PEFT writes too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def weight(self) -> torch.Tensor:  # code that reads `head.weight` keeps working
        return self._current().weight

    def add_adapter(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_active(self, adapter_names: list[str]) -> None:
        mine = [a for a in adapter_names if a in self.modules_to_save]
        if len(mine) > 1:
            raise ValueError(
                f"Adapters {mine} each carry their own copy of this module (modules_to_save), and only one copy "
                "can be used at a time. Activate one of them, or combine them with add_weighted_adapter."
            )
        self.active_adapter = mine[0] if mine else None

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # state_dict, not parameters: buffers (e.g. a norm's running statistics) belong to the copy too.
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    def _current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)
