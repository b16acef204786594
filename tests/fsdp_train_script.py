"""Run by tests/test_fsdp.py under `accelerate launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml`: train from
a YAML run config (argv: config, key=value overrides, optionally --resume). Before training, rank 0 writes what the
sharding looks like to <output_dir>/fsdp_facts.json; with PEFTLAB_TEST_CRASH_AT=N every process stops (as a crash
would) when step N is about to start."""

import json
import os
import sys

from peftlab.train import Trainer, load_run_config, train


def _facts(trainer: Trainer) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    block = trainer.peft_model.get_base_model().model.layers[0]
    q = block.self_attn.q_proj

    def shape(t):
        return {"dtensor": isinstance(t, DTensor), "global": list(t.shape),
                "local": list(t.to_local().shape) if isinstance(t, DTensor) else list(t.shape),
                "requires_grad": t.requires_grad}

    return {"log": trainer.sharding.describe(trainer.accelerator.num_processes),
            "block_is_fsdp_unit": isinstance(block, FSDPModule),
            "root_is_fsdp_unit": isinstance(trainer.model, FSDPModule),
            "base_weight": shape(q.base_layer.weight), "lora_A": shape(q.lora_A["default"].weight)}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resume"]
    run = load_run_config(args[0], args[1:])
    original_fit, original_step = Trainer.fit, Trainer._step
    crash_at = int(os.environ.get("PEFTLAB_TEST_CRASH_AT", "0"))

    def fit(self):
        if self.accelerator.is_main_process:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            with open(os.path.join(self.cfg.output_dir, "fsdp_facts.json"), "w") as fh:
                json.dump(_facts(self), fh)
        return original_fit(self)

    def step(self):
        if self.state.step == crash_at:
            raise SystemExit(f"simulated crash before step {crash_at + 1}")
        return original_step(self)

    Trainer.fit = fit
    if crash_at:
        Trainer._step = step
    train(run, resume="--resume" in sys.argv, log=lambda *_: None)
