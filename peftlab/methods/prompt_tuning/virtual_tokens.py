"""What prompt tuning, prefix tuning and P-tuning share: virtual tokens in front of the real ones.

Two kinds (`PromptLearningConfig.prefix` tells which):
- prompt (prompt tuning, P-tuning): T virtual-token embeddings P (T, D) are put before the input embeddings,
      inputs_embeds' = [P ; E(input_ids)]            (B, T + n, D)
  attention_mask gets T leading ones, token labels T leading -100, position_ids / token_type_ids T leading
  positions / zeros. A causal LM's logits therefore have T more (leading) positions, as in HF PEFT.
- prefix (prefix tuning): every layer l gets T trainable key/value rows before the real ones,
      K_l' = [Pk_l ; K_l],  V_l' = [Pv_l ; V_l]      (B, H_kv, T + n, d_head)
  handed to the model as a pre-filled cache (transformers' DynamicCache, under the model's `cache` or older
  `past_key_values` argument); attention_mask gets T leading ones and the real tokens' positions start at T.
  Logits keep the input's length.

The model-level module (`Method.model_modules`, kept at `PeftModel.prompt_encoder[adapter]` as in PEFT) returns the
virtual rows of one example when called: (T * num_transformer_submodules, D) for prompts, (T, L * 2 * D_kv) for
prefixes, where one row of a prefix is laid out [layer 0 keys | layer 0 values | layer 1 keys | ...], each
H_kv x d_head (PEFT's layout, so the files interchange).

Files (PEFT's layout): one tensor `prompt_embeddings` = the module's output (for P-tuning and projected prefixes the
encoder's OUTPUT, not its weights), plus the task head under `base_model.<path>` (PEFT's keys for prompt learning
have no `.model`). As in PEFT, a model loaded for inference (inference_mode, i.e. not is_trainable) holds only that
output in a plain table and runs no encoder. A trainable adapter with an encoder (P-tuning's MLP/LSTM, prefix tuning
with prefix_projection) also writes the encoder's own weights under `prompt_encoder.<name>` keys, so `--resume` and
`from_pretrained(..., is_trainable=True)` continue training from them; PEFT's loader ignores those keys (checked in
tests/test_method_p_tuning.py), and PEFT itself cannot load prompt adapters as trainable at all.

Differences from PEFT, on purpose:
- SEQ_CLS on decoder models (Llama's `score` head pools at the last non-pad token, which it finds from input_ids,
  absent when inputs_embeds carries the prompt; it then reads the LAST position, a pad in right-padded rows, which is
  what PEFT computes): rows that contain padding are rearranged as [virtual tokens][pads][real tokens] with explicit
  positions 0..T-1, T.., so the last position is the last real token and every real token sees what it sees in an
  unpadded row. Unpadded batches compute exactly PEFT's logits.
- position_ids passed by the caller are kept (offset by T behind the virtual tokens); PEFT drops them for prompts.
  For unpadded rows both equal the model's default positions.
- token_type_ids get T leading zeros for every task (PEFT drops them for causal LMs, which rarely take them).
- Several active prompt adapters, packed rows (4D attention masks), a caller-supplied non-empty cache in forward,
  static/compiled caches in generate, and prefix tuning under gradient checkpointing are refused with a message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import nn

from ...core.config import ConfigError, TaskType
from ...io.adapter_files import KEY_PREFIX, AdapterFileError
from ...models.compat import CACHE_KWARGS, cache_kwarg, given_cache
from .prompt_learning import PromptLearningConfig

STORE = "prompt_encoder"  # PeftModel.prompt_encoder[adapter]: PEFT's name
FILE_KEY = "prompt_embeddings"  # PEFT's one tensor per prompt-learning adapter



def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _first(config, names: tuple[str, ...]):
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    return None


def complete_config(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """Fill the model-shaped fields from the model's config as PEFT does (PEFT's _prepare_prompt_learning_config),
    and check they fit the model. Prefix tuning on grouped-query attention (Llama, SmolLM2): token_dim =
    num_key_value_heads x head_dim and num_attention_heads = num_key_value_heads, the shape of the keys it caches."""
    name = type(config).__name__
    mc = _text_config(model)
    seq2seq = _is_seq2seq(model)
    changes: dict[str, Any] = {}

    def need(field_name: str, value):
        if value is None:
            raise ConfigError(f"{name}.{field_name} is None and {type(model).__name__} has no config to read it from; "
                              f"set {field_name} explicitly.")
        changes[field_name] = value

    if config.num_layers is None:
        need("num_layers", _first(mc, ("num_hidden_layers", "num_layers", "n_layer")))
    if config.token_dim is None:
        need("token_dim", _first(mc, ("hidden_size", "n_embd", "d_model")))
    if config.num_attention_heads is None:
        need("num_attention_heads",
             _first(mc, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")))
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    config = dataclasses.replace(config, **changes)

    hidden = _first(mc, ("hidden_size", "n_embd", "d_model"))
    if config.prefix and getattr(mc, "num_key_value_heads", None) is not None:
        kv_heads = mc.num_key_value_heads
        head_dim = getattr(mc, "head_dim", None) or (hidden or config.token_dim) // config.num_attention_heads
        want = {"token_dim": head_dim * kv_heads, "num_attention_heads": kv_heads}
        given = {k: v for k, v in want.items() if k not in changes and getattr(config, k) != v}
        if given:
            k = next(iter(given))
            raise ConfigError(f"{name}.{k}={getattr(config, k)} does not fit {type(model).__name__}: its attention "
                              f"caches {kv_heads} key/value heads of {head_dim}, so a prefix needs token_dim="
                              f"{want['token_dim']} and num_attention_heads={kv_heads}. Leave both at None.")
        config = dataclasses.replace(config, **want)
    elif not config.prefix and hidden is not None and config.token_dim != hidden:
        raise ConfigError(f"{name}.token_dim={config.token_dim} does not fit {type(model).__name__}, whose input "
                          f"embeddings are {hidden} wide; virtual tokens are placed among them. Leave token_dim=None.")
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(f"{name}.token_dim={config.token_dim} is not a multiple of num_attention_heads="
                          f"{config.num_attention_heads}; set both to the model's values (or leave them None).")
    if config.num_transformer_submodules == 2 and not seq2seq:
        raise ConfigError(f"{name}.num_transformer_submodules=2 is for encoder-decoder models, and "
                          f"{type(model).__name__} is not one; use 1 (or None).")
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config = dataclasses.replace(config, encoder_hidden_size=config.token_dim)
    if config.prefix and _gradient_checkpointing(model):
        raise ConfigError(f"{name}: prefix tuning hands its prefixes to the model as a key/value cache, which "
                          "gradient checkpointing would extend twice (once more when a layer is recomputed). Turn "
                          "gradient checkpointing off (train.gradient_checkpointing: false).")
    return config


def _gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# ---- the model-level module ------------------------------------------------------------------------------------


class PromptTable(nn.Module):
    """Virtual rows stored as they are used: prompt tuning's embeddings, prefix tuning's key/value rows without
    projection, and (as in PEFT) the saved OUTPUT of an encoder when an adapter is loaded for inference.
    `embedding.weight` is (rows, width); calling the module returns it."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)  # N(0, 1) rows: PEFT's RANDOM init

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def word_embeddings(model: nn.Module) -> nn.Module:
    layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no input embedding layer (get_input_embeddings() is None); "
                         "virtual tokens are placed among the input embeddings, so this model cannot take them.")
    return layer


def embedding_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def rows_of(peft_model, adapter_name: str) -> torch.Tensor:
    """The adapter's virtual rows for one example (the module's output, with gradients)."""
    return peft_model._modules[STORE][adapter_name]()


def rows_for_file(module: nn.Module) -> torch.Tensor:
    """The rows as saved: the module's output in eval mode (no LSTM dropout), without gradients."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module().detach()
    finally:
        module.train(was)


# ---- files ---------------------------------------------------------------------------------------------------


def to_file(peft_model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """adapter_tensors -> PEFT's file layout: `prompt_embeddings` (the rows) + the head under `base_model.<path>`; a
    trainable encoder also keeps its weights under `prompt_encoder.<name>` (for resuming; PEFT ignores them)."""
    module = peft_model._modules[STORE][adapter_name]
    out = {}
    for key, tensor in tensors.items():
        if key.startswith(f"{STORE}."):
            if not isinstance(module, PromptTable):
                out[key] = tensor
        else:
            out["base_model." + key.removeprefix(KEY_PREFIX) if key.startswith(KEY_PREFIX) else key] = tensor
    out[FILE_KEY] = rows_for_file(module)
    return out


def from_file(peft_model, adapter_name: str, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file (ours or PEFT's) -> adapter_tensors keys (the inverse of `to_file`)."""
    config = peft_model.peft_config[adapter_name]
    module = peft_model._modules[STORE][adapter_name]
    out = {KEY_PREFIX + k.removeprefix("base_model.") if k.startswith("base_model.") else k: v
           for k, v in found.items() if k != FILE_KEY and not k.startswith(f"{STORE}.")}
    name = type(config).__name__
    if isinstance(module, PromptTable):
        if FILE_KEY not in found:
            raise AdapterFileError(f"The adapter file has no '{FILE_KEY}' tensor, which every {name} file holds "
                                   f"(found: {sorted(found)[:6]}); it is not a prompt-learning adapter file.")
        want, got = tuple(module.embedding.weight.shape), tuple(found[FILE_KEY].shape)
        if got != want:
            raise AdapterFileError(
                f"The file's '{FILE_KEY}' is {got}, but this {name} needs {want} (virtual tokens x width: "
                f"num_virtual_tokens={config.num_virtual_tokens}, num_transformer_submodules="
                f"{config.num_transformer_submodules}, token_dim={config.token_dim}, num_layers={config.num_layers}). "
                "Load it onto the base model it was trained on, with its own adapter_config.json.")
        out[f"{STORE}.embedding.weight"] = found[FILE_KEY]
        return out
    encoder = {k: v for k, v in found.items() if k.startswith(f"{STORE}.")}
    if not encoder:
        what = "LSTM/MLP prompt encoder" if not config.prefix else "prefix projection (embedding + MLP)"
        plain = "PromptTuningConfig" if not config.prefix else "PrefixTuningConfig with prefix_projection=False"
        raise AdapterFileError(
            f"This file holds only the encoder's output '{FILE_KEY}' (as HF PEFT saves it), not the weights of the "
            f"{what} that training as {name} continues from. Load it for inference (is_trainable=False), or train "
            f"those virtual rows directly by loading it with config={plain}(...) of the same num_virtual_tokens.")
    out.update(encoder)
    return out


# ---- forward -------------------------------------------------------------------------------------------------


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _reads_last_position(model: nn.Module, config) -> bool:
    """A decoder seq-cls model (transformers names its head `score`; BERT-like encoders say `classifier` and pool
    the first position) that picks the last non-pad position from input_ids, and the last position from
    inputs_embeds."""
    return (config.task_type == TaskType.SEQ_CLS and not _is_seq2seq(model)
            and isinstance(getattr(model, "score", None), nn.Module))


def _check_inputs(config, kwargs: dict) -> None:
    name = type(config).__name__
    mask = kwargs.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"{name}: got an attention_mask of shape {shape}; virtual tokens need the 2D (batch, "
                         "length) padding mask to extend. Packed rows (4D block-diagonal masks) are not supported: "
                         "set data.packing: false.")
    key, cache = given_cache(kwargs)
    if cache is not None and not (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
        raise ValueError(f"{name}: forward got a filled {key}; the virtual tokens are added on the first "
                         "step only, so continuing from a cache is done by generate(). Call model.generate(...), or "
                         "run forward on the whole sequence.")


def _batch_size(kwargs: dict, config) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError(f"{type(config).__name__}: forward needs input_ids or inputs_embeds.")


def forward(peft_model, adapter_name: str, kwargs: dict):
    """Method.forward for the virtual-token methods (see the module docstring)."""
    config = peft_model.peft_config[adapter_name]
    model = peft_model.get_base_model()
    kwargs = dict(kwargs)
    _check_inputs(config, kwargs)
    if config.prefix:
        return _prefix_forward(peft_model, adapter_name, model, config, kwargs)
    return _prompt_forward(peft_model, adapter_name, model, config, kwargs)


def _leading(tensor: torch.Tensor, T: int, value) -> torch.Tensor:
    """`tensor` (B, n) with T leading columns of `value`: (B, T + n)."""
    lead = torch.full((tensor.shape[0], T), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([lead, tensor], dim=1)


def _prompt_forward(peft_model, adapter_name, model, config, kwargs):
    T = config.num_virtual_tokens
    B = _batch_size(kwargs, config)
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = word_embeddings(model)(ids)
    prompts = rows_of(peft_model, adapter_name)[:T].to(embeds.dtype)  # (T, D); seq2seq keeps 2T, the encoder uses T
    embeds = torch.cat([prompts.unsqueeze(0).expand(B, -1, -1), embeds], dim=1)  # (B, T + n, D)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = _leading(kwargs["attention_mask"], T, 1)
    if not _is_seq2seq(model):  # encoder-decoder: only the encoder's inputs change, labels are the decoder's
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1] - T:
            kwargs["labels"] = _leading(labels, T, -100)  # token labels: virtual positions predict nothing
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _leading(kwargs["token_type_ids"], T, 0)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            head = torch.arange(T, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], T)
            kwargs["position_ids"] = torch.cat([head, pos + T], dim=1)
        if _reads_last_position(model, config) and kwargs.get("attention_mask") is not None:
            embeds = _pads_before_real_tokens(embeds, kwargs, T)
    return model(inputs_embeds=embeds, **kwargs)


def _pads_before_real_tokens(embeds: torch.Tensor, kwargs: dict, T: int) -> torch.Tensor:
    """Rows with padding become [virtual tokens][pads][real tokens] (stable, so real tokens keep their order), with
    positions 0..T-1 for the virtual and T.. for the real tokens: the last position is then the last real token,
    which a decoder seq-cls head reads when it gets inputs_embeds, and each real token computes as in an unpadded
    row (pads are masked; none is fully masked, as pads may attend to the virtual tokens)."""
    mask = kwargs["attention_mask"]  # (B, T + n)
    if bool(mask[:, T:].ne(0).all()):
        return embeds  # no padding: nothing moves (exactly PEFT's computation)
    rest = mask[:, T:].ne(0)
    order = torch.argsort(rest.to(torch.int8), dim=1, stable=True) + T  # pads (0) first, then real tokens
    order = torch.cat([torch.arange(T, device=order.device).expand(order.shape[0], T), order], dim=1)
    embeds = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    kwargs["attention_mask"] = mask.gather(1, order)
    for key in ("token_type_ids", "position_ids"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key].expand(order.shape[0], -1).gather(1, order)
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = (kwargs["attention_mask"].ne(0).long().cumsum(1) - 1).clamp_min(0)
    return embeds


def prefix_layers(peft_model, adapter_name: str, batch_size: int, dtype: torch.dtype | None):
    """[(keys, values)] per layer, each (B, H_kv, T, d_head), from the adapter's rows (T, L * 2 * H_kv * d_head)."""
    config = peft_model.peft_config[adapter_name]
    T, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    rows = rows_of(peft_model, adapter_name)
    if dtype is not None:
        rows = rows.to(dtype)
    kv = rows.view(T, 2 * L, H, config.token_dim // H).permute(1, 2, 0, 3)  # (2L, H, T, d_head)
    # Decoder-only and encoder models: layer i takes entries 2i (keys) and 2i + 1 (values). Encoder-decoder models
    # (num_transformer_submodules=2), as PEFT builds them so that files and outputs agree: the 2L entries are listed
    # twice and cut into groups of 4 (self keys, self values, cross keys, cross values) per decoder layer, and the
    # cross part is then dropped (cross-attention is computed from the encoder); so decoder layer i takes entries
    # 4i mod 2L and 4i + 1 mod 2L (with 2 layers: both take entries 0 and 1).
    step = 4 if config.num_transformer_submodules == 2 else 2
    return [(kv[(step * i) % (2 * L)].expand(batch_size, -1, -1, -1),
             kv[(step * i + 1) % (2 * L)].expand(batch_size, -1, -1, -1)) for i in range(L)]


def _fill(cache, layers) -> None:
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)


def _new_cache(layers, seq2seq: bool):
    from transformers import DynamicCache, EncoderDecoderCache

    if seq2seq:  # the decoder's self-attention gets the prefix; cross-attention is computed from the encoder
        return EncoderDecoderCache(DynamicCache(layers), DynamicCache())
    return DynamicCache(layers)


def _prefix_forward(peft_model, adapter_name, model, config, kwargs):
    T = config.num_virtual_tokens
    if model.training and torch.is_grad_enabled() and _gradient_checkpointing(model):
        raise ValueError(f"{type(config).__name__}: gradient checkpointing is on, and it would add the prefix cache "
                         "twice when a layer is recomputed. Turn it off (model.gradient_checkpointing_disable()).")
    B = _batch_size(kwargs, config)
    layers = prefix_layers(peft_model, adapter_name, B, getattr(model, "dtype", None))
    seq2seq = _is_seq2seq(model)
    for key in CACHE_KWARGS:  # an empty cache the caller passed (checked above) is replaced by the prefix cache
        kwargs.pop(key, None)
    kwargs[cache_kwarg(model)] = _new_cache(layers, seq2seq)
    mask_key = "decoder_attention_mask" if seq2seq else "attention_mask"
    if kwargs.get(mask_key) is not None:
        kwargs[mask_key] = _leading(kwargs[mask_key], T, 1)
    if not seq2seq and kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + T
    return model(**kwargs)


# ---- generate ------------------------------------------------------------------------------------------------


def generate(peft_model, adapter_name: str, kwargs: dict):
    """Method.generate: as HF generate on the base model, with the virtual tokens (or prefixes) put in on the first
    step. Decoder models and encoder-decoder prefixes: through the base model's prepare_inputs_for_generation, so
    input_ids, lengths and logits processors are those of the real tokens (PEFT's way). Encoder-decoder prompts:
    the encoder gets the virtual tokens in inputs_embeds."""
    config = peft_model.peft_config[adapter_name]
    model = peft_model.get_base_model()
    kwargs = dict(kwargs)
    if torch.is_tensor(kwargs.get("inputs")) and kwargs.get("input_ids") is None:
        kwargs["input_ids"] = kwargs.pop("inputs")
    if _is_seq2seq(model) and not config.prefix:
        T = config.num_virtual_tokens
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise ValueError(f"{type(config).__name__}: generate needs input_ids (or inputs_embeds).")
            embeds = word_embeddings(model)(ids)
        prompts = rows_of(peft_model, adapter_name)[:T].to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _leading(kwargs["attention_mask"], T, 1)
        return model.generate(**kwargs)
    with _prepare_hook(model, _step_inputs(peft_model, adapter_name, model, config)):
        return model.generate(**kwargs)


@contextlib.contextmanager
def _prepare_hook(model: nn.Module, rewrite):
    """Run `rewrite(inputs)` on what the model's prepare_inputs_for_generation returns, for one generate call."""
    original = model.prepare_inputs_for_generation
    had_own = "prepare_inputs_for_generation" in model.__dict__

    def prepare(*args, **kwargs):
        return rewrite(original(*args, **kwargs))

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation


def _step_inputs(peft_model, adapter_name, model, config):
    T = config.num_virtual_tokens
    seq2seq = _is_seq2seq(model)
    name = type(config).__name__

    def rewrite(inputs: dict) -> dict:
        key, cache = given_cache(inputs)
        key = key or cache_kwarg(model)
        # The first step sees an empty cache. With use_cache=False every step runs on the whole sequence, so it is
        # a first step too; the model may still hand back the prefix cache it was given: that one is not reused.
        first = cache is None or cache.get_seq_length() == 0 or inputs.get("use_cache") is False
        if first and inputs.get("use_cache") is False:
            cache = inputs[key] = None
        x = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if x is None:
            x = inputs.get("decoder_input_ids")
        B = x.shape[0]
        if config.prefix and first:
            layers = prefix_layers(peft_model, adapter_name, B, getattr(model, "dtype", None))
            if cache is None:
                inputs[key] = _new_cache(layers, seq2seq)
            else:
                target = cache.self_attention_cache if seq2seq else cache
                from transformers import DynamicCache

                if type(target) is not DynamicCache:
                    raise ValueError(f"{name}: generate uses a {type(target).__name__}; prefix tuning fills a "
                                     "DynamicCache with its prefixes. Leave cache_implementation unset.")
                _fill(target, layers)
        if seq2seq:  # prefix only: the decoder's inputs, masks and positions are its own
            return inputs
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not torch.is_tensor(mask) or mask.dim() != 2:
                raise ValueError(f"{name}: generate built a {getattr(mask, 'dim', lambda: '?')()}D attention mask "
                                 "(a static or compiled cache); virtual tokens need the 2D padding mask. Leave "
                                 "cache_implementation unset.")
            inputs["attention_mask"] = _leading(mask, T, 1)
        pos = inputs.get("position_ids")
        if not config.prefix and first:
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                embeds = word_embeddings(model)(inputs["input_ids"])
            prompts = rows_of(peft_model, adapter_name)[:T].to(embeds.dtype)
            inputs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(B, -1, -1), embeds], dim=1)
            inputs["input_ids"] = None
            if pos is not None:
                head = torch.arange(T, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], T)
                inputs["position_ids"] = torch.cat([head, pos + T], dim=1)
        elif pos is not None:
            inputs["position_ids"] = pos + T
        return inputs

    return rewrite


# ---- text / vocabulary initialisation (prompt tuning) ----------------------------------------------------------


def text_rows(model: nn.Module, text: str, tokenizer_name_or_path: str, tokenizer_kwargs: dict | None,
              total: int) -> torch.Tensor:
    """(total, D) float32: the input embeddings of `text`'s tokens (as the tokenizer encodes it, special tokens
    included), repeated / cut to `total` rows, as PEFT's TEXT init does."""
    import os

    from ...models import load_tokenizer

    kwargs = dict(tokenizer_kwargs or {})
    if kwargs.pop("trust_remote_code", None):
        warnings.warn("tokenizer_kwargs['trust_remote_code'] is ignored: loading an adapter config must not run "
                      "code from a hub repository (PEFT ignores it too).")
    if os.path.isdir(os.path.expanduser(tokenizer_name_or_path)):  # a tokenizer folder needs no model config.json
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer_name_or_path), **kwargs)
    else:  # a shipped name ("smollm2") or a hub id (the local HF cache first)
        tokenizer = load_tokenizer(tokenizer_name_or_path, **kwargs)
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={text!r} encodes to no token with {tokenizer_name_or_path!r}; "
                          "give a non-empty text.")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return _embedding_rows(model, torch.tensor(ids, dtype=torch.long))


def vocab_rows(model: nn.Module, total: int) -> torch.Tensor:
    """(total, D) float32: the input embeddings of `total` token ids drawn uniformly from the vocabulary (PEFT's
    SAMPLE_VOCAB: one torch.randint from the global generator)."""
    layer = word_embeddings(model)
    ids = torch.randint(0, layer.num_embeddings, (total,), dtype=torch.long)
    return _embedding_rows(model, ids)


def _embedding_rows(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    layer = word_embeddings(model)
    with torch.no_grad():
        return layer(ids.to(layer.weight.device)).detach().clone().to(torch.float32)


METHOD_HOOKS = dict(merges=False, layers=(), complete_config=complete_config, forward=forward, generate=generate,
                    to_file=to_file, from_file=from_file)
"""The Method(...) arguments the three virtual-token methods share."""

__all__ = ["FILE_KEY", "METHOD_HOOKS", "PromptLearningConfig", "PromptTable", "STORE", "complete_config",
           "embedding_device", "forward", "from_file", "generate", "prefix_layers", "rows_for_file", "rows_of",
           "text_rows", "to_file", "vocab_rows", "word_embeddings"]
