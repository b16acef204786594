"""Merging adapters into the base weights, unloading them, and combining adapters: PeftModel's merge half.

`MergeMixin` is a base of `PeftModel` (core/model.py); the merge arithmetic itself is each layer's
(`AdapterLayer.merge` / `unmerge`), and `add_weighted_adapter` is the method's `combine`.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..io import adapter_files


class MergeMixin:
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
                      allow_non_finite: bool = False) -> None:
        """Add the adapters' updates into the base weights (forward then skips the adapter branch)."""
        names = self._active if adapter_names is None else adapter_names
        for n in names:
            self._check_known(n)
            if not allow_non_finite:  # a diverged adapter would turn the merged model's weights into NaN for good
                adapter_files.check_finite(self.adapter_tensors(n), f"adapter {n!r}")
        for n in names:
            method = self.method_of(n)
            if not method.merges:
                raise ValueError(
                    f"Adapter {n!r} ({method.name}: {method.summary}) cannot be merged into the base weights: its "
                    "effect is not a weight update. Keep it as an adapter (save_pretrained / from_pretrained); "
                    "nothing was changed.")
        for _, layer in self.adapter_layers():
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, allow_non_finite: bool = False) -> nn.Module:
        """Merge the active (or named) adapters into the base weights and return the plain base model."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge, allow_non_finite=allow_non_finite)
        return self._unwrap(keep_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        in_place = self.trains_base_in_place(list(self.peft_config))
        if in_place:
            warnings.warn(f"Adapters {in_place} trained base-model weights in place (full, bitfit, or bias != "
                          "'none'); unload() removes the adapters but cannot restore the original weights.")
        self.unmerge_adapter()
        return self._unwrap(keep_copies=False)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **options) -> None:
        """A new adapter combining existing ones (see the method's `combine` for the formulas)."""
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"Give one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights.")
        methods = {self.method_of(a).name for a in adapters}
        if len(methods) > 1:
            raise ValueError(f"Adapters {adapters} use different methods ({sorted(methods)}); combine one method at a time.")
        method = self.method_of(adapters[0])
        if method.combine is None:
            raise NotImplementedError(f"{method.name} adapters cannot be combined with add_weighted_adapter.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
        method.combine(self, adapters, weights, adapter_name, combination_type, **options)
