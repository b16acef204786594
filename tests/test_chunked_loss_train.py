"""train.chunked_loss: causal_lm / sft losses from the last hidden states, lm_head + cross-entropy in chunks.

The chunked task loss equals lm_loss_sum over the full logits (and its gradients equal theirs) for Llama (tied,
untied, with an lm_head bias) and GPT-2, padded, packed and prompt-masked batches, virtual tokens and a modules_to_save
lm_head; the lm_head never runs and no tensor as large as the logits is made; a training run with it reaches the
adapter the full-logits run reaches; models it would not compute exactly fall back under auto and raise under on."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from peftlab import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftlab.core.config import ConfigError
from peftlab.data import Collator, DataConfig, encode_rows
from peftlab.train import Trainer, TrainConfig, build_run_config, load_run_config, train
from peftlab.train.lm_loss import chunked_loss_blocker
from peftlab.train.tasks import TASK_TABLE, count_lm_units, lm_loss_sum

from .conftest import VOCAB, run_config, save_tiny, sentences, tiny_gpt2, tiny_llama, tiny_tokenizer, write_jsonl

ATTENTION = {"llama": ["q_proj", "v_proj"], "llama_tied": ["q_proj", "v_proj"], "llama_bias": ["q_proj", "v_proj"],
             "gpt2": ["c_attn"]}


def _run(mode: str):
    """What Task.forward reads of a RunConfig: run.train.chunked_loss."""
    return types.SimpleNamespace(train=TrainConfig(chunked_loss=mode))


def _tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _llama_with_head_bias() -> LlamaForCausalLM:
    model = tiny_llama()
    head = nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 0.5)
    model.lm_head = head
    return model


MODELS = {"llama": tiny_llama, "llama_tied": _tied_llama, "llama_bias": _llama_with_head_bias, "gpt2": tiny_gpt2}


def _lora(kind: str, train_head: bool = True, **extra):
    """LoRA on the attention; the lm_head's own weight (and bias) also trained, so dW and db are compared too
    (for tied models that weight is the input embedding as well)."""
    pm = get_peft_model(MODELS[kind](), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION[kind],
                                                   init_lora_weights=False, **extra))
    if train_head:
        for p in pm.get_base_model().get_output_embeddings().parameters():
            p.requires_grad_(True)
    return pm


def _batch(task: str, packing: bool, n: int = 6, max_length: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    """A collated batch as the loop builds it: causal_lm text or sft prompt/response rows (prompt labels -100),
    padded, or packed (position_ids restarting per example, a 4D block-diagonal mask)."""
    texts = sentences(2 * n, seed=seed)
    rows = ([{"text": t} for t in texts[:n]] if task == "causal_lm" else
            [{"prompt": p, "response": r} for p, r in zip(texts[:n], texts[n:])])
    cfg = DataConfig(train_file="unused.jsonl", max_length=max_length, packing=packing)
    tok = tiny_tokenizer()
    examples = encode_rows(rows, task, tok, cfg)
    batch = Collator(tok.pad_token_id, task)(examples)
    assert ("position_ids" in batch) == packing
    return batch


def _loss_and_grads(pm, batch, mode, task="causal_lm"):
    pm.zero_grad(set_to_none=True)
    out = TASK_TABLE[task].forward(pm, pm, batch, _run(mode))
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None}
    return out, grads


def _assert_same(pm, batch, task="causal_lm"):
    full, g_full = _loss_and_grads(pm, batch, "off", task)
    chunked, g_chunked = _loss_and_grads(pm, batch, "on", task)
    assert full.logits is not None and chunked.logits is None
    ref, units = lm_loss_sum(full.logits, batch)
    torch.testing.assert_close(full.loss_sum, ref)
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, rtol=1e-5, atol=1e-5)
    assert chunked.units == full.units == units
    assert g_full and g_chunked.keys() == g_full.keys()
    for name in g_full:  # fp32 sums in another order: relative to the gradient's largest entry
        scale = float(g_full[name].abs().max())
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    return g_full


# ---- the loss and its gradients equal the full-logits ones -------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("task,packing", [("causal_lm", False), ("causal_lm", True), ("sft", False), ("sft", True)])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(kind, task, packing):
    pm = _lora(kind)
    batch = _batch(task, packing)
    if task == "sft":  # the prompts are masked: fewer targets than next-token pairs
        assert count_lm_units(batch) < int((batch["input_ids"][:, 1:] != 0).sum())
    if packing:
        assert int((batch["position_ids"] == 0).sum()) > batch["input_ids"].shape[0]  # several examples per row
    grads = _assert_same(pm, batch, task)
    assert any("lora_B" in n for n in grads) and any(n.endswith("weight") and "lora" not in n for n in grads)
    if kind == "llama_bias":
        assert any(n.endswith("lm_head.bias") for n in grads)


def test_auto_uses_the_chunked_loss_for_a_plain_head_and_evaluation_works_without_grad():
    pm = _lora("llama", train_head=False)
    batch = _batch("causal_lm", False)
    with torch.no_grad():
        auto = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("auto"))
        off = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("off"))
    assert auto.logits is None and off.logits is not None
    torch.testing.assert_close(auto.loss_sum, off.loss_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_and_prefixes_are_handled(config):
    # Prompt tuning makes the hidden states (B, 3 + T, d): the 3 leading positions get no target, as lm_loss_sum
    # does for the logits. Prefix tuning keeps the length (its virtual keys/values sit in the cache).
    pm = get_peft_model(tiny_llama(), config)
    batch = _batch("sft", False)
    grads = _assert_same(pm, batch, "sft")
    assert grads and all(n.startswith("prompt_encoder") for n in grads)


def test_a_modules_to_save_lm_head_uses_the_trained_copy():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                                 modules_to_save=["lm_head"]))
    wrapper = pm.get_base_model().lm_head
    with torch.no_grad():  # make the copy differ from the original, so using the wrong one shows
        wrapper.modules_to_save["default"].weight.add_(0.3 * torch.randn_like(wrapper.original_module.weight))
    batch = _batch("causal_lm", False)
    grads = _assert_same(pm, batch)
    assert any("modules_to_save.default.weight" in n for n in grads)
    assert wrapper.original_module.weight.grad is None
    with pm.disable_adapter(), torch.no_grad():  # adapters disabled: the original head, in both paths
        off = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("off"))
        on = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("on"))
    torch.testing.assert_close(on.loss_sum, off.loss_sum, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        enabled = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("on"))
    assert abs(float(enabled.loss_sum) - float(on.loss_sum)) > 1.0


# ---- memory: no lm_head forward, nothing as large as the logits --------------------------------------------------

class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_chunked_path_never_runs_the_lm_head_nor_makes_a_logits_sized_tensor(mode):
    pm = _lora("llama", train_head=False)
    batch = _batch("causal_lm", False, n=6, max_length=24)
    B, T = batch["input_ids"].shape
    calls = []
    handle = pm.get_base_model().lm_head.register_forward_hook(lambda _m, _a, out: calls.append(tuple(out.shape)))
    # The probe (once per model; the Trainer runs it at start) is the only full forward: one row, 16 tokens.
    chunked_loss_blocker(pm, batch["input_ids"])
    assert calls == [(1, min(16, T), VOCAB)]
    calls.clear()
    spy = _LargestTensor()
    try:
        with spy:
            out = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run(mode))
            out.loss_sum.backward()
    finally:
        handle.remove()
    # (B, T, V) = 6 x 24 x 96 = 13824 elements; the largest other tensors (attention scores B x 4 x T x T, MLP
    # activations B x T x 64) are 9216 at most, and a chunk of logits holds only target rows (< B x T).
    if mode == "on":
        assert calls == [] and spy.largest < B * T * VOCAB
    else:
        assert calls == [(B, T, VOCAB)] and spy.largest >= B * T * VOCAB  # the check can fail: the full path trips it


# ---- models the chunked loss would not compute exactly -----------------------------------------------------------

class _SoftCappedLlama(LlamaForCausalLM):
    """A causal LM that changes its logits after the lm_head without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out


def _capped_llama():
    torch.manual_seed(0)
    return _SoftCappedLlama(tiny_llama().config).eval()


def _gemma2(cap):
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       final_logit_softcapping=cap)
    return Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("case,reason", [
    ("lora_on_lm_head", r"'lm_head' carries an adapter layer"),
    ("gemma2_softcap", r"final_logit_softcapping=30\.0"),
    ("undeclared_softcap", r"differ from lm_head\(hidden states\)"),
])
def test_auto_falls_back_and_on_raises_when_the_loss_would_differ(case, reason):
    if case == "lora_on_lm_head":
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    else:
        base = _gemma2(30.0) if case == "gemma2_softcap" else _capped_llama()
        pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    batch = _batch("causal_lm", False)
    auto = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("auto"))
    assert auto.logits is not None
    torch.testing.assert_close(auto.loss_sum, lm_loss_sum(auto.logits, batch)[0])
    with pytest.raises(ConfigError, match=r"train.chunked_loss=on.*" + reason + r".*Use chunked_loss: auto"):
        TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run("on"))


def test_gemma2_without_soft_capping_runs_chunked_and_matches():
    pm = get_peft_model(_gemma2(None), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert chunked_loss_blocker(pm, _batch("causal_lm", False)["input_ids"])[1] is None
    _assert_same(pm, _batch("causal_lm", False))


def test_the_probe_alone_catches_an_undeclared_change():
    # The config says nothing (no soft-capping attribute), so only the probe forward can tell.
    pm = get_peft_model(_capped_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert chunked_loss_blocker(pm)[1] is None  # without probe input: config checks only
    assert "differ" in chunked_loss_blocker(pm, _batch("causal_lm", False)["input_ids"])[1]


# ---- the training loop -----------------------------------------------------------------------------------------

def _train_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["split"] == "train"]


def _adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("task,packing", [("causal_lm", False), ("sft", True)])
def test_training_with_the_chunked_loss_reaches_the_full_logits_adapter(llama_dir, tmp_path, task, packing):
    if task == "causal_lm":
        data = tmp_path / "corpus.txt"
        data.write_text("\n\n".join(sentences(40)))
    else:
        texts = sentences(64, seed=4)
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in zip(texts[:32], texts[32:])])
    results, logs = {}, {}
    for mode in ("on", "off"):
        run = run_config(llama_dir, task, str(data), tmp_path / mode, chunked_loss=mode)
        run.data.packing = packing
        logs[mode] = []
        results[mode] = train(run, log=logs[mode].append)
    assert any("chunked lm_head + cross-entropy" in line for line in logs["on"]), logs["on"]
    assert any("full logits (train.chunked_loss=off)" in line for line in logs["off"]), logs["off"]
    losses = _train_losses(tmp_path / "on")
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_train_losses(tmp_path / "off")), rtol=1e-4,
                               atol=1e-5)
    on, off = results["on"], results["off"]
    assert on["after"]["loss"] < on["before"]["loss"]
    for key in ("loss", "perplexity"):
        assert on["after"][key] == pytest.approx(off["after"][key], rel=1e-4)
    a, b = _adapter(tmp_path / "on"), _adapter(tmp_path / "off")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_trainer_refuses_on_when_the_head_carries_an_adapter(llama_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(sentences(20)))
    run = run_config(llama_dir, "causal_lm", str(data), tmp_path / "o", chunked_loss="on",
                     method={"name": "lora", "r": 2, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match=r"chunked_loss=on.*'lm_head' carries an adapter layer"):
        Trainer(run, log=lambda *_: None)
    lines = []
    run.train.chunked_loss = "auto"
    Trainer(run, log=lines.append)
    assert any("full logits (train.chunked_loss=auto: 'lm_head' carries an adapter layer" in x for x in lines), lines


# ---- config ------------------------------------------------------------------------------------------------------

def _config_file(tmp_path, task="causal_lm"):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "x", "task": task, "method": "lora", "data": {"train_file": "t.txt"}}))
    return str(path)


@pytest.mark.parametrize("value,expected", [("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on")])
def test_yaml_on_and_off_read_as_modes(tmp_path, value, expected):
    # YAML 1.1 reads a bare on / off as booleans; they mean the modes of the same name.
    assert load_run_config(_config_file(tmp_path), [f"train.chunked_loss={value}"]).train.chunked_loss == expected
    assert load_run_config(_config_file(tmp_path)).train.chunked_loss == "auto"


def test_bad_chunked_loss_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"chunked_loss='maybe' is not valid; use one of: 'auto', 'on', 'off'"):
        load_run_config(_config_file(tmp_path), ["train.chunked_loss=maybe"])
    with pytest.raises(ConfigError, match=r"chunked_loss=on applies to task causal_lm or sft.*task is classify"):
        load_run_config(_config_file(tmp_path, "classify"), ["train.chunked_loss=on"])
    run = build_run_config({"model": "x", "task": "classify", "method": "lora", "data": {"train_file": "t.txt"},
                            "train": {"chunked_loss": "auto"}})
    assert run.train.chunked_loss == "auto"  # auto (the default) is fine for every task: it applies where it can


# ---- several processes -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_with_the_chunked_loss_match_one_with_full_logits(tmp_path):
    from .test_distributed import assert_two_processes_match_one

    model_dir = save_tiny(tmp_path / "llama", "llama")
    (tmp_path / "corpus.txt").write_text("\n\n".join(sentences(48)))
    assert_two_processes_match_one(tmp_path, {
        "model": model_dir, "task": "causal_lm",
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": str(tmp_path / "corpus.txt"), "eval_fraction": 0.2, "max_length": 32},
        "train": {"lr": 1e-2, "max_steps": 4, "log_every": 1, "progress": False, "tensorboard": False,
                  "precision": "fp32"}},
        one_overrides=["train.chunked_loss=off"], two_overrides=["train.chunked_loss=on"])



def test_first_use_inside_autocast_probes_in_fp32_and_matches_the_full_logits():
    """Under bf16 autocast (the GPU training case; CPU autocast here) the first chunked forward runs the probe inside
    the caller's autocast: both of the probe's sides must still be fp32, or a bf16 rounding reads as a logit change
    and `on` refuses a plain Llama. The chunked loss and LoRA gradients then match the full logits' under the same
    autocast (both round the same bf16 hidden states; the tolerance allows the different fp32 summation order)."""
    batch = _batch("causal_lm", packing=False)

    def loss_and_grads(pm, mode):
        pm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = TASK_TABLE["causal_lm"].forward(pm, pm, batch, _run(mode))
        out.loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n}

    full, full_grads = loss_and_grads(_lora("llama", train_head=False), "off")
    chunked, chunked_grads = loss_and_grads(_lora("llama", train_head=False), "on")  # a fresh model: first use
    assert chunked.logits is None and chunked.units == full.units
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, rtol=1e-4, atol=1e-4)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
