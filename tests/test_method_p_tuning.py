"""P-tuning (PromptEncoderConfig) against HF PEFT (`import peft`, the reference) on tiny models.

Invariants checked:
- the same seed gives PEFT's initial encoder (MLP and LSTM), parameter names included;
- the encoder computes P = MLP(E) / MLP(BiLSTM(E)) (checked against the layers applied by hand);
- the same weights give PEFT's logits (llama CAUSAL_LM, bert SEQ_CLS, t5 SEQ_2_SEQ_LM; MLP and LSTM);
- files: `prompt_embeddings` holds the encoder's output (PEFT's layout); a trainable adapter's file also holds the
  encoder's weights, which PEFT ignores (same logits), and which make is_trainable loading and `--resume` exact; a
  model loaded for inference holds only the output (PEFT's inference mode) and saves exactly PEFT's file; PEFT's file
  cannot be trained on as P-tuning, and the error says how to train its rows instead;
- --resume of a Trainer run equals the uninterrupted run (LSTM with dropout: encoder weights and RNG both restored),
  and the run trains (loss falls, encoder moves, base stays);
- bad values raise errors that say what to do.
"""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
from safetensors.torch import load_file

from peftlab import AdapterFileError, PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peftlab.core.config import ConfigError

from .conftest import run_config, save_tiny, sentences, straight_and_resumed
from .test_method_prompt_tuning import (TASK, TIGHT, WEIGHTS, build, file_shapes, inputs, logits, pair,
                                        peft_file_config_keys)


pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def ours(kind="llama", **cfg):
    cfg.setdefault("task_type", TASK[kind])
    cfg.setdefault("num_virtual_tokens", 3)
    return get_peft_model(build(kind), PromptEncoderConfig(**cfg))


@pytest.mark.parametrize("cfg", [dict(), dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=8),
                                 dict(encoder_reparameterization_type="LSTM", encoder_num_layers=1)])
def test_same_seed_gives_peft_initial_encoder(cfg):
    mine = ours(**cfg)
    theirs = hf.get_peft_model(build("llama"), hf.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM",
                                                                     **cfg))
    a, b = mine.prompt_encoder["default"].state_dict(), theirs.prompt_encoder["default"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mine.peft_config["default"].encoder_hidden_size == theirs.peft_config["default"].encoder_hidden_size


def test_encoder_computes_mlp_of_bilstm_of_the_embeddings():
    enc = ours(encoder_reparameterization_type="LSTM", encoder_hidden_size=8).prompt_encoder["default"]
    E = enc.embedding.weight  # (3, 32)
    lstm = enc.lstm_head
    h = [E]
    for layer in range(2):  # a bidirectional LSTM by hand: forward and backward passes, outputs concatenated
        outs = []
        for suffix, seq in (("", h[-1]), ("_reverse", h[-1].flip(0))):
            W_ih, W_hh = getattr(lstm, f"weight_ih_l{layer}{suffix}"), getattr(lstm, f"weight_hh_l{layer}{suffix}")
            b = getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")
            hs, c, steps = torch.zeros(8), torch.zeros(8), []
            for x_t in seq:
                i, f, g, o = (W_ih @ x_t + W_hh @ hs + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                hs = torch.sigmoid(o) * torch.tanh(c)
                steps.append(hs)
            out = torch.stack(steps)
            outs.append(out if suffix == "" else out.flip(0))
        h.append(torch.cat(outs, dim=-1))  # (3, 16)
    m = enc.mlp_head
    expected = m[2](torch.relu(m[0](h[-1])))
    torch.testing.assert_close(enc(), expected, rtol=1e-5, atol=1e-6)
    mlp = ours().prompt_encoder["default"]
    m = mlp.mlp_head
    torch.testing.assert_close(mlp(), m[4](torch.relu(m[2](torch.relu(m[0](mlp.embedding.weight))))), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_same_logits_as_peft_for_the_same_weights(kind, encoder):
    mine, theirs = pair("PromptEncoderConfig", kind, num_virtual_tokens=3, encoder_reparameterization_type=encoder)
    x = inputs(kind)
    torch.testing.assert_close(logits(mine, x), logits(theirs, x), **TIGHT)


@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
def test_files_cross_both_ways(kind, tmp_path):
    mine, theirs = pair("PromptEncoderConfig", kind, num_virtual_tokens=3, encoder_reparameterization_type="LSTM")
    x = inputs(kind)
    expected = logits(theirs, x)
    mine.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ours_keys, peft_keys = file_shapes(tmp_path / "ours"), file_shapes(tmp_path / "peft")
    rows = 6 if kind == "t5" else 3  # t5: num_transformer_submodules=2 keeps 2T rows (the encoder uses the first T)
    assert peft_keys["prompt_embeddings"] == (rows, 32)
    extra = {k: v for k, v in ours_keys.items() if k not in peft_keys}
    assert {k: v for k, v in ours_keys.items() if k in peft_keys} == peft_keys
    assert set(extra) == {k.replace(".default.", ".", 1) for k in theirs.state_dict() if k.startswith("prompt_enc")}
    assert set(json.loads((tmp_path / "ours" / "adapter_config.json").read_text())) == peft_file_config_keys(
        tmp_path / "peft")
    saved = load_file(str(tmp_path / "ours" / WEIGHTS))["prompt_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(saved, mine.prompt_encoder["default"](), rtol=0, atol=0)  # the encoder's OUTPUT
    # PEFT reads our file, ignoring the encoder's weights; we read PEFT's for inference (a table of the output).
    torch.testing.assert_close(logits(hf.PeftModel.from_pretrained(build(kind), tmp_path / "ours"), x), expected,
                               **TIGHT)
    loaded = PeftModel.from_pretrained(build(kind), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, x), expected, **TIGHT)
    assert [k for k in loaded.adapter_tensors("default") if k.startswith("prompt_encoder")] == [
        "prompt_encoder.embedding.weight"]
    loaded.save_pretrained(tmp_path / "again")  # an inference-mode model writes exactly PEFT's file
    assert file_shapes(tmp_path / "again") == peft_keys


def test_trainable_loading_restores_the_encoder_and_peft_files_say_what_to_do(tmp_path):
    mine = ours(encoder_reparameterization_type="LSTM")
    mine.save_pretrained(tmp_path / "ours")
    again = PeftModel.from_pretrained(build("llama"), tmp_path / "ours", is_trainable=True)
    want = mine.prompt_encoder["default"].state_dict()
    got = again.prompt_encoder["default"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.requires_grad for p in again.prompt_encoder.parameters())
    x = inputs("llama")
    expected = logits(mine, x)
    torch.testing.assert_close(logits(again, x), expected, rtol=0, atol=0)

    theirs = hf.get_peft_model(build("llama"), hf.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterFileError, match=r"only the encoder's output.*config=PromptTuningConfig"):
        PeftModel.from_pretrained(build("llama"), tmp_path / "peft", is_trainable=True)
    rows = PeftModel.from_pretrained(build("llama"), tmp_path / "peft", is_trainable=True,
                                     config=PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    torch.testing.assert_close(logits(rows, x), logits(theirs, x), **TIGHT)


def _corpus(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(sentences(40)))
    return str(txt)


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    txt = _corpus(tmp_path)
    # LSTM with dropout between its 2 layers: the encoder's weights, optimizer moments and RNG must all come back.
    method = {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
              "encoder_hidden_size": 16, "encoder_dropout": 0.2}
    straight, broken, at_crash = straight_and_resumed(
        lambda out: run_config(model_dir, "causal_lm", txt, out, method=method, save_every=3, lr=1e-2), tmp_path,
        monkeypatch)
    assert at_crash == ["step-000003", "step-000006"]
    a, b = (load_file(str(d / "adapter" / WEIGHTS)) for d in (straight, broken))
    assert a.keys() == b.keys() and "prompt_encoder.lstm_head.weight_ih_l0" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    checkpoint = load_file(str(broken / "checkpoints" / "step-000012" / "adapter" / WEIGHTS))
    assert checkpoint.keys() == a.keys()


def test_trains_through_the_trainer(tmp_path):
    from peftlab.train import Trainer

    model_dir = save_tiny(tmp_path / "llama", "llama")
    trainer = Trainer(run_config(model_dir, "causal_lm", _corpus(tmp_path), tmp_path / "run", lr=1e-2,
                                 method={"name": "p_tuning", "num_virtual_tokens": 4}), log=lambda *_: None)
    model = trainer.peft_model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {k: t.detach().clone() for k, t in model.prompt_encoder["default"].state_dict().items()}
    result = trainer.fit()
    assert result["after"]["loss"] < result["before"]["loss"] - 0.05, result
    assert all(not torch.equal(t, before[k]) for k, t in model.prompt_encoder["default"].state_dict().items())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_mlp_ignores_encoder_num_layers_with_a_warning_as_peft():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_virtual_tokens=-1), "num_virtual_tokens=-1 is not valid"),
    (dict(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "encoder_reparameterization_type='GRU'"),
    (dict(num_virtual_tokens=2, encoder_dropout=1.5), "encoder_dropout=1.5 is not valid"),
    (dict(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size=0 is not valid"),
    (dict(num_virtual_tokens=2, target_modules="all-linear"), "does not wrap modules"),
])
def test_config_errors_say_what_to_do(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PromptEncoderConfig(**kwargs)
