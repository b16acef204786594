"""LLaMA-Adapter's adapted attention (PEFT's AdaptedAttention), wrapping a Llama-like attention module.

For adapter a with prompt P (1, K, hidden) and gate g (1,) in one layer, and that layer's input h (B, T, hidden):
    q   = RoPE(h W_q)                                  (B, H, T, d)   the layer's own queries, rotated
    K_p = P W_k, V_p = P W_v                           (1, H, K, d)   (key/value heads repeated to H, as the layer
                                                                        repeats them; no rotation: the prompt has
                                                                        no position)
    S_p = g * softmax(q K_p^T / sqrt(d))               (B, H, T, K)   softmax over the K prompt vectors alone
    out = attention(h) + o_proj(S_p V_p)                              the layer's own output plus the gated branch
g starts at 0, so the adapter starts as the identity and the branch's gradient reaches P only once g has moved.
This is the paper's eq. (separate softmax for the prompt, zero-init gating) as PEFT 0.21.2 computes it: the
branch goes through o_proj as a module (a bias of o_proj would be added once more; Llama/Mistral have none).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ...core.layer import AdapterLayer
from .config import AdaptionPromptConfig


def is_llama_attention(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"))


class AdaptedAttention(AdapterLayer):
    adapter_containers = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def add_adapter(self, adapter_name: str, config: AdaptionPromptConfig, module_name: str) -> None:
        weight = self.base_layer.q_proj.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        hidden = self.base_layer.config.hidden_size
        # Drawn as PEFT draws them (N(0, 1) prompt, then a zero gate, layer by layer from the bottom adapted one):
        # the same seed gives PEFT's initial prompts.
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.empty(1, config.adapter_len, hidden, device=weight.device, dtype=dtype).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {"adaption_prompt": self.adaption_prompt[adapter_name],
                "adaption_gate": self.adaption_gate[adapter_name]}

    def unmerge(self) -> None:
        return None  # never merged (Method.merges=False): nothing to undo, and the attention module has no `weight`

    def _prompt_heads(self, proj: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
        """(1, K, hidden) -> (1, H, K, d): projected like the layer's keys/values, KV heads repeated to H."""
        attn = self.base_layer
        out = proj(prompt.to(proj.weight.dtype))
        out = out.view(1, prompt.shape[1], -1, attn.head_dim).transpose(1, 2)  # (1, H_kv, K, d)
        return torch.repeat_interleave(out, attn.config.num_attention_heads // out.shape[1], dim=1)

    def forward(self, *args, **kwargs):
        output = self.base_layer(*args, **kwargs)
        live = self.live_adapters()
        if not live:
            return output
        attn = self.base_layer
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rope is None:
            raise ValueError(f"{type(attn).__name__} was called without position_embeddings (cos, sin), which the "
                             "adaption prompt needs to rotate the queries as the layer does; this transformers "
                             "model computes attention in a way peftlab's LLaMA-Adapter does not know.")
        bsz, q_len, _ = hidden.shape
        cos, sin = (t.unsqueeze(1) for t in rope)  # (B, 1, T, d)
        q = attn.q_proj(hidden).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
        q = q * cos + rotate_half(q) * sin
        attn_out, rest = output[0], output[1:]
        for name in live:
            prompt, gate = self.adaption_prompt[name], self.adaption_gate[name]
            keys = self._prompt_heads(attn.k_proj, prompt)
            values = self._prompt_heads(attn.v_proj, prompt)
            scores = q @ keys.transpose(2, 3).to(q.dtype) / math.sqrt(attn.head_dim)  # (B, H, T, K)
            probs = (gate * torch.softmax(scores, dim=-1, dtype=torch.float32)).to(values.dtype)
            branch = (probs @ values).transpose(1, 2).reshape(bsz, q_len, -1)  # (B, T, H d)
            attn_out = attn_out + attn.o_proj(branch).to(attn_out.dtype)
        return (attn_out, *rest)
