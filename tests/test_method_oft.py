"""OFT against HF PEFT 0.21 (the reference) on tiny models; shared checks in tests/peft_parity.py.

Invariants: the same seed gives PEFT's θ (zeros, or N(0, 0.1) with init_weights=False) and the same logits, also
after random perturbation, for the Neumann series and the exact Cayley map, block sharing, COFT and a block size
moved to a divisor; files cross both ways; R is block-diagonal and orthogonal (exactly for the Cayley map, to the
series' error for Neumann) and the layer computes W (R^T x); COFT keeps each block within its radius; merge ==
unmerged and unmerge restores (also GPT-2's Conv1D, which PEFT does not wrap); module_dropout (applied in training
only) replaces blocks by the identity; training moves θ only; the folder's conformance examples pass.
"""

from __future__ import annotations

import peft as hf
import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.oft import OFTConfig, OFTLayer
from peftlab.methods.oft.layer import cayley_neumann, nearest_divisor

from .conftest import BUILDERS
from .peft_parity import merge_matches, round_trips, same_init_and_logits, trains

WORDS = ("oft_R",)
pytestmark = pytest.mark.usefixtures("quiet_warnings")

VARIANTS = {
    "block8": dict(oft_block_size=8),
    "r4-random": dict(r=4, oft_block_size=0, init_weights=False),
    "share-random": dict(oft_block_size=8, block_share=True, init_weights=False),
    "exact-cayley": dict(oft_block_size=16, use_cayley_neumann=False, init_weights=False),
    "coft-block5-3terms": dict(oft_block_size=5, coft=True, eps=1e-2, init_weights=False,
                               num_cayley_neumann_terms=3, target_modules=["q_proj", "down_proj"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_init_and_logits_as_peft(variant):
    same_init_and_logits(OFTConfig, hf.OFTConfig, WORDS, **VARIANTS[variant])


@pytest.mark.parametrize("variant", ["r4-random", "coft-block5-3terms"])
def test_files_cross_both_ways(variant, tmp_path):
    round_trips(OFTConfig, hf.OFTConfig, WORDS, tmp_path, **VARIANTS[variant])


def test_nearest_divisor_is_peft_rule():
    from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer

    for size in (32, 48, 64, 96, 100):
        for wanted in range(1, size + 3):
            if size % wanted or wanted > size:
                assert nearest_divisor(size, wanted) == PeftOFTLayer.adjust_oft_parameters(None, size, wanted)


def _layer(**cfg) -> OFTLayer:
    model = peftlab.get_peft_model(BUILDERS["llama"](), OFTConfig(init_weights=False, **cfg))
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("neumann", [True, False])
def test_rotation_is_block_diagonal_orthogonal_and_rotates_the_input(neumann):
    layer = _layer(oft_block_size=8, use_cayley_neumann=neumann)
    rotation = layer.oft_R["default"]
    with torch.no_grad():
        rotation.weight.mul_(0.2)  # |S_i| ~ 0.15: the series' truncation error is of order |S|^4
    R = rotation.matrix()
    off = R.clone()
    for i in range(4):
        off[8 * i: 8 * i + 8, 8 * i: 8 * i + 8] = 0
    assert torch.count_nonzero(off) == 0
    # exact Cayley: orthogonal to rounding; Neumann (5 terms): to the series' truncation error
    tol = 1e-5 if not neumann else 1e-3
    torch.testing.assert_close(R @ R.T, torch.eye(32), rtol=0, atol=tol)
    S = rotation.skew(rotation.weight.detach())
    if not neumann:
        eye = torch.eye(8).expand_as(S)
        torch.testing.assert_close(rotation.blocks(), (eye - S) @ torch.linalg.inv(eye + S), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ R @ layer.base_layer.weight.T, rtol=1e-5, atol=1e-6)


def test_neumann_series_terms():
    S = torch.randn(2, 4, 4) * 0.1
    S = S - S.transpose(1, 2)
    I = torch.eye(4).expand_as(S)  # noqa: E741
    powers = [torch.linalg.matrix_power(S, k) for k in range(6)]
    torch.testing.assert_close(cayley_neumann(S, 1), I)
    torch.testing.assert_close(cayley_neumann(S, 2), I + 2 * S)
    torch.testing.assert_close(cayley_neumann(S, 4), I + 2 * S + 2 * powers[2] + powers[3])
    torch.testing.assert_close(cayley_neumann(S, 6), I + 2 * (S + powers[2] + powers[3] + powers[4]) + powers[5])


def test_coft_keeps_each_block_within_its_radius():
    layer = _layer(oft_block_size=8, coft=True, eps=1e-3)
    rotation = layer.oft_R["default"]
    with torch.no_grad():
        rotation.weight.mul_(100)
    rotation.blocks()  # projects θ in place, as PEFT does before each use
    norms = torch.linalg.matrix_norm(rotation.skew(rotation.weight.detach()))
    assert torch.all(norms <= 1e-3 / 2 * (1 + 1e-5))  # eps / sqrt(4 blocks)


def test_merge_equals_unmerged_also_on_gpt2_conv1d():
    merge_matches(peftlab.get_peft_model(BUILDERS["llama"](), OFTConfig(oft_block_size=8, init_weights=False)))
    gpt2 = peftlab.get_peft_model(BUILDERS["gpt2"](), OFTConfig(oft_block_size=8, init_weights=False,
                                                              task_type="CAUSAL_LM"))
    assert gpt2.peft_config["default"].fan_in_fan_out
    merge_matches(gpt2, "gpt2")


def test_module_dropout_replaces_blocks_by_identity_in_training_only():
    layer = _layer(oft_block_size=8, module_dropout=0.5)
    rotation = layer.oft_R["default"]
    exact = rotation.eval().blocks()
    rotation.train()
    torch.manual_seed(0)
    dropped = rotation.blocks()
    is_eye = [torch.equal(b, torch.eye(8)) for b in dropped]
    assert sum(is_eye) == 2  # int(0.5 x 4 blocks)
    for b, e, eye in zip(dropped, exact, is_eye):
        assert eye or torch.equal(b, e)


def test_trains_theta_only():
    trains(peftlab.get_peft_model(BUILDERS["llama"](), OFTConfig(oft_block_size=8, task_type="CAUSAL_LM")))


def test_bad_config_says_what_to_do():
    with pytest.raises(ConfigError, match="exactly one"):
        OFTConfig(r=4)  # with the default oft_block_size=32
    with pytest.raises(ConfigError, match="exactly one"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ConfigError, match="bias"):
        OFTConfig(bias="lora_only")

