"""VeRA: shared frozen random projections A, B and trained per-layer scaling vectors d, b (see layer.py)."""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from .config import VeraConfig
from .layer import VeraLinear, vera_projections


def _saves_projection(config: VeraConfig) -> bool:
    return config.save_projection


METHOD = register(Method(
    name="vera",
    config_cls=VeraConfig,
    layers=((nn.Linear, VeraLinear), (Conv1D, VeraLinear)),
    summary="W + diag(b) B diag(d) A with one frozen random pair A, B shared by all layers; trains only d, b",
    default_targets=ATTENTION_QV_TARGETS,
    shared_tensors=vera_projections,
    saves_shared=_saves_projection,
))

__all__ = ["VeraConfig", "VeraLinear", "METHOD"]
