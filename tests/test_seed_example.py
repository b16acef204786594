"""The seed example from the project brief runs unchanged on a tiny model, and the wrapper passes
`generate` and attribute access through to the base model."""

from __future__ import annotations

import pytest
import torch

from .conftest import model_inputs, output_of, tiny_llama


def test_seed_example_runs_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base, fresh_base = tiny_llama(), tiny_llama()
    # --- the seed, verbatim ---
    from peftlab import LoraConfig, TaskType, get_peft_model, PeftModel
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, task_type=TaskType.CAUSAL_LM))
    model.print_trainable_parameters()
    model.save_pretrained("out"); PeftModel.from_pretrained(fresh_base, "out")
    # --- checks ---
    printed = capsys.readouterr().out.strip()
    trainable, total = model.get_nb_trainable_parameters()
    # q_proj (32 -> 32) and v_proj (32 -> 16) in 2 layers, r=16: A (16, 32) + B (out, 16)
    assert trainable == 2 * ((16 * 32 + 32 * 16) + (16 * 32 + 16 * 16))
    assert printed == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_generate_and_attributes_pass_through():
    from peftlab import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, init_lora_weights=False))
    assert model.config.model_type == "llama"  # attribute of the base model
    ids = model_inputs("llama")["input_ids"][:1]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    model.merge_adapter()  # merged weights generate the same greedy tokens
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), out)
    with pytest.warns(UserWarning, match="unmerging"), model.disable_adapter():
        base_logits = output_of(model, {"input_ids": ids})
    # unmerge subtracts the update again: equal to the base up to one float rounding per weight
    torch.testing.assert_close(base_logits, output_of(tiny_llama(), {"input_ids": ids}))
