"""What every comparison with HF PEFT (`import peft`, the reference implementation) shares: tolerances, task names,
file reading, randomising a model's trainable tensors, and the file round trip in both directions.

tests/test_conformance.py runs `assert_files_cross_both_ways` on every example that sets `peft_round_trip=True`; the
per-method test files import the rest and keep only their method's own maths.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import peft as hf
import torch
from safetensors.torch import load_file

import peftlab

from .conftest import BUILDERS, TinyConv, model_inputs, output_of

# Both libraries compute the same fp32 ops in the same order; only summation order inside matmuls may differ.
TIGHT = dict(rtol=1e-5, atol=1e-6)
# A table loaded from an encoder's saved output (P-tuning, projected prefixes) against the encoder run anew: the MLP's
# GEMMs split differently, and a logit of size ~0.05 differs by up to 1.6e-6 (measured).
ENCODER_TIGHT = dict(rtol=1e-5, atol=5e-6)
# The task each tiny architecture of tests/conftest.py is built for.
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# Keys only PEFT writes into adapter_config.json: its version stamp and the hub's auto class.
PEFT_STAMPS = {"peft_version", "auto_mapping"}


def build(kind: str) -> torch.nn.Module:
    """A tiny model of tests/conftest.py, or "conv": TinyConv (an nn.Conv2d target without a config)."""
    return TinyConv() if kind == "conv" else BUILDERS[kind]()


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    if kind == "conv":
        return {"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))}
    return model_inputs(kind)


def logits(model, kind: str) -> torch.Tensor:
    """The model's output on `inputs_for(kind)`: TinyConv's tensor or a transformer's logits (autograd on)."""
    out = model(**inputs_for(kind))
    return out if isinstance(out, torch.Tensor) else out.logits


def forward(model, kind: str) -> torch.Tensor:
    """`logits` without gradients."""
    with torch.no_grad():
        return logits(model, kind)


def file_shapes(folder) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the adapter file in `folder`."""
    return {k: tuple(v.shape) for k, v in load_file(str(Path(folder) / WEIGHTS)).items()}


def config_keys(folder) -> set[str]:
    return set(json.loads((Path(folder) / CONFIG).read_text()))


def randomise_trainable(model, seed: int = 0, scale: float = 0.1) -> None:
    """Add scale * N(0, 1) to every trainable tensor, in parameter-name order (reproducible by seed), so that outputs
    compared after a round trip cannot agree by being at their (often identity) initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b)


def assert_files_cross_both_ways(ours, fresh_base: Callable[[], torch.nn.Module], x: dict, folder: Path, *,
                                 encoder_output_on_load: bool = False) -> None:
    """The HF PEFT round trip, both ways, for the adapter "default" of `ours` (a peftlab PeftModel whose adapter
    tensors are not at their initial values):

    1. peftlab saves; PEFT loads the folder onto `fresh_base()` and computes the same output;
    2. PEFT builds its model from that same adapter_config.json, its trainable tensors are randomised, it saves, and
       peftlab loads PEFT's folder and computes PEFT's output;
    3. both files hold the same tensor names with the same shapes, and every setting of our adapter_config.json is a
       key PEFT writes too, or empty (None, [], {}): nothing of ours is ignored silently on PEFT's side (PEFT 0.21's
       VeraConfig has no exclude_modules, which ours writes as null).
    With `encoder_output_on_load` (P-tuning, projected prefixes) our file may also hold the encoder, which PEFT does not
    save, and outputs agree to ENCODER_TIGHT.
    """
    tol = ENCODER_TIGHT if encoder_output_on_load else TIGHT
    base_out = output_of(fresh_base(), x)
    expected = output_of(ours, x)
    ours.save_pretrained(folder / "ours")
    theirs = hf.PeftModel.from_pretrained(fresh_base(), folder / "ours")
    torch.testing.assert_close(output_of(theirs, x), expected, **tol)

    config = hf.PeftConfig.from_pretrained(folder / "ours")
    config.inference_mode = False  # our file says inference mode; PEFT's model must train (be randomised) here
    theirs = hf.get_peft_model(fresh_base(), config).eval()  # get_peft_model switches to train mode: dropout
    randomise_trainable(theirs, seed=1)
    expected = output_of(theirs, x)
    assert _differs(expected, base_out), "PEFT's randomised adapter should change the output"
    theirs.save_pretrained(folder / "peft")
    back = peftlab.PeftModel.from_pretrained(fresh_base(), folder / "peft")
    torch.testing.assert_close(output_of(back, x), expected, **tol)

    ours_shapes, peft_shapes = file_shapes(folder / "ours"), file_shapes(folder / "peft")
    if encoder_output_on_load:
        ours_shapes = {k: v for k, v in ours_shapes.items() if k in peft_shapes}
    assert sorted(set(ours_shapes) ^ set(peft_shapes)) == [], "tensor names only one library writes"
    assert ours_shapes == peft_shapes
    ours_config = json.loads((folder / "ours" / CONFIG).read_text())
    dropped = {k: v for k, v in ours_config.items() if k not in config_keys(folder / "peft") and v not in (None, [], {})}
    assert not dropped, f"adapter_config.json settings PEFT does not know (it would ignore them): {dropped}"


# ---- checks a method's own test file runs against PEFT (used by tests/test_method_loha.py) ---------------------------
# `words` are the substrings that name the method's adapter tensors in parameter names (LoHa: ("hada_",)); configs are
# the method's own class and PEFT's, built with the same keyword arguments on the tiny Llama.


def _pair(ours_cls, peft_cls, kind: str = "llama", seed: int = 0, **cfg):
    """The same config in both libraries on the same tiny base, each built right after torch.manual_seed(seed), so
    that the same seed gives the same initial factors where the two initialise alike."""
    base = BUILDERS[kind]()
    torch.manual_seed(seed)
    ours = peftlab.get_peft_model(base, ours_cls(**cfg))
    base = BUILDERS[kind]()
    torch.manual_seed(seed)
    theirs = hf.get_peft_model(base, peft_cls(**cfg))
    return ours, theirs


def _named(model, words) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if any(w in n for w in words)}


def same_init_and_logits(ours_cls, peft_cls, words, kind: str = "llama", **cfg) -> None:
    """Same seed -> PEFT's initial tensors bit for bit (same names, shapes, values) and the same logits; then the same
    random perturbation of both -> still the same logits (so the agreement is not that of an identity init)."""
    ours, theirs = _pair(ours_cls, peft_cls, kind, **cfg)
    a, b = _named(ours, words), _named(theirs, words)
    assert a and sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    x = model_inputs(kind)
    torch.testing.assert_close(output_of(ours, x), output_of(theirs, x), **TIGHT)
    randomise_trainable(ours, seed=3)
    randomise_trainable(theirs, seed=3)
    torch.testing.assert_close(output_of(ours, x), output_of(theirs, x), **TIGHT)


def round_trips(ours_cls, peft_cls, words, tmp_path: Path, kind: str = "llama", **cfg) -> None:
    """Files cross both ways: ours -> PEFT and PEFT -> ours give the same logits; both files hold the same tensor names
    and shapes (some named by `words`), and PEFT reads our config with the same values for every field we set."""
    ours, theirs = _pair(ours_cls, peft_cls, kind, **cfg)
    randomise_trainable(ours, seed=1)
    assert_files_cross_both_ways(ours, BUILDERS[kind], model_inputs(kind), Path(tmp_path))
    assert any(any(w in k for w in words) for k in file_shapes(Path(tmp_path) / "ours"))
    read = hf.PeftConfig.from_pretrained(Path(tmp_path) / "ours")
    assert isinstance(read, peft_cls)
    for key, value in cfg.items():
        got = getattr(read, key)
        if key == "target_modules" and not isinstance(value, str):
            got, value = set(got), set(value)
        assert got == value, key


def merge_matches(model, kind: str = "llama") -> None:
    """merge_adapter() computes the unmerged output, changes the base weights, and unmerge_adapter() restores them (to
    one float rounding per weight) and the output."""
    x = model_inputs(kind)
    adapter = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapter}
    unmerged = output_of(model, x)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, x), unmerged, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before), "merge changed nothing"
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6, msg=n)
    torch.testing.assert_close(output_of(model, x), unmerged, rtol=1e-5, atol=1e-5)


def trains(model, kind: str = "llama", steps: int = 10) -> None:
    """A few AdamW steps on one batch: the loss falls, every trainable tensor moves, no frozen tensor does."""
    x = model_inputs(kind)
    model.train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable[n]), f"{n} did not move"
        else:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"

