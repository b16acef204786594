"""The conformance suite's generic invariants, run on one method folder's EXAMPLES (peftlab/core/examples.py) by that
method's own test file, so a new method is checked from its own tests too (tests/test_conformance.py runs them for
every registered method). Invariants: identity at init (where the example has it); disable_adapter() gives the base
back; merge == unmerged and unmerge restores the base (or merging is refused, for methods with merges=False); only
trainable adapter tensors get gradients; save -> load is exact; unload() gives the base back; 30 optimizer steps on
one batch make the loss fall, move the adapter and leave the base as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab import PeftModel, get_peft_model
from peftlab.core.layer import AdapterLayer

from .conftest import BUILDERS, model_inputs, output_of


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.adapter_tensors("default").values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)


def _base_params(model):
    owned = {id(t) for t in model.adapter_tensors("default").values()}
    return {n: p for n, p in model.named_parameters() if id(p) not in owned}


def check_example(example, tmp_path) -> None:
    arch, make = example.arch, example.make_config
    x = model_inputs(arch)
    base = BUILDERS[arch]()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, make())
    if example.identity_at_init:
        torch.testing.assert_close(output_of(model, x), output_of(reference, x), rtol=0, atol=0)

    _perturb(model)
    expected, out = output_of(reference, x), output_of(model, x)
    assert out.shape != expected.shape or not torch.allclose(out, expected), "a perturbed adapter changes the output"
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, x), expected, rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in _base_params(model).items()}
    if not model.method_of("default").merges:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_adapter()
    else:
        model.merge_adapter()
        torch.testing.assert_close(output_of(model, x), out, rtol=1e-5, atol=1e-5)
        assert any(not torch.equal(p, before[n]) for n, p in _base_params(model).items()), "merge changed nothing"
        model.unmerge_adapter()
        for n, p in _base_params(model).items():
            torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6, msg=n)

    model.train()
    model(**x).logits.float().pow(2).mean().backward()
    owned = {id(t) for t in model.trainable_tensors("default").values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == owned
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad and with_grad <= owned
    model.zero_grad(set_to_none=True)
    model.eval()

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path)
    saved, back = model.adapter_tensors("default"), loaded.adapter_tensors("default")
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    torch.testing.assert_close(output_of(loaded, x), out, rtol=0, atol=0)
    plain = loaded.unload()  # a model never merged: the base exactly
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(output_of(plain, x), expected, rtol=0, atol=0)

    model = get_peft_model(BUILDERS[arch](), make()).train()
    labels = x["decoder_input_ids"] if arch == "t5" else (torch.tensor([0, 2]) if arch == "bert" else x["input_ids"])
    base_before = {n: p.detach().clone() for n, p in _base_params(model).items()}
    adapter_before = {k: t.detach().clone() for k, t in model.adapter_tensors("default").items()}
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr=5e-2))
    losses = []
    for step in range(1, 31):
        loss = model(**x, labels=labels).loss
        loss.backward()
        opt.step()
        model.on_step(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    assert any(not torch.equal(t, adapter_before[k]) for k, t in model.adapter_tensors("default").items())
    for n, p in _base_params(model).items():
        assert torch.equal(p, base_before[n]), f"base weight {n} changed"
