"""`peftlab.integrations.Trainer`: transformers' Trainer, saving and resuming a peftlab model as adapter files.

Why a subclass: a stock `transformers.Trainer` trains a peftlab model with its default arguments (PeftModel.forward
shows the base model's parameters to Trainer's column filter), but it writes and reads checkpoints through
`isinstance(model, (PreTrainedModel, peft.PeftModel))`, which no other class can pass: for anything else
`save_model()` and every checkpoint hold the whole model's state dict (model.safetensors) and resuming reads that.
This subclass changes only those three places for a peftlab PeftModel: `_save` writes `save_pretrained`'s adapter
folder (PEFT's layout: adapter_config.json + adapter_model.safetensors, other adapters in sub-folders), and
`_load_from_checkpoint` / `_load_best_model` load such folders back into the live adapters. Everything else, and
any other model, is Trainer's own code. Use it exactly as transformers' Trainer.
"""

from __future__ import annotations

import os

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from ..core.config import CONFIG_NAME
from ..core.model import PeftModel


class Trainer(transformers.Trainer):
    """transformers.Trainer; a peftlab model is saved, checkpointed and resumed as adapter files (module docstring)."""

    def _peft_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peft_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir)
        # The rest of Trainer._save: the tokenizer (or processor) and the training arguments beside the weights.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._load_adapters(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_adapters(self.state.best_model_checkpoint):
            super()._load_best_model()

    def _load_adapters(self, folder: str) -> bool:
        """Load every adapter of the model that `folder` holds (the "default" one at its top, others in sub-folders,
        as save_pretrained writes them) into the live adapters; False when this is not a peftlab model's
        checkpoint (Trainer's own loading then runs)."""
        model = self._peft_model()
        if model is None or not os.path.isfile(os.path.join(folder, CONFIG_NAME)) and not any(
                os.path.isfile(os.path.join(folder, n, CONFIG_NAME)) for n in model.peft_config):
            return False
        active = model.active_adapters
        for name in model.peft_config:
            path = folder if name == "default" else os.path.join(folder, name)
            if os.path.isfile(os.path.join(path, CONFIG_NAME)):
                model.load_adapter(path, name, is_trainable=name in active)
        model.set_adapter(active)  # as Trainer does for PEFT models; also restores which tensors train
        return True
