"""task ppo: the math against hand computations (GAE, clipped policy and value losses, KL-penalised rewards), the
reference is the base with adapters disabled and never moves, a reward adapter loaded onto the causal-LM base scores
as its sequence-classification model does, a tiny run raises its reward, resume equals an uninterrupted run, and
bad configs, reward folders and bases are refused with clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.core.config import ConfigError, TaskType
from peftlab.data import DataConfig, encode_rows
from peftlab.train import build_run_config, load_run_config, train
from peftlab.train.ppo import PPOTrainer, load_value_head, pad_rows, train_ppo
from peftlab.train.ppo_math import (entropy_from_logits, gae, kl_penalty_rewards, logprobs_from_logits, policy_loss,
                                    response_mask, value_loss, whiten)
from peftlab.train.preference import last_attended_index

from .conftest import save_tiny, tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["write a review", "hello how are you", "the movie was", "what is your name"]
GREAT = tiny_tokenizer().convert_tokens_to_ids("great")


def great_fraction(prompts, texts, ids):
    """The tiny run's reward: the share of response tokens that are "great"."""
    return [sum(t == GREAT for t in r) / max(len(r), 1) for r in ids]


def ppo_run(model_dir, out, ppo=None, method=None, **train_opts):
    return build_run_config({
        "model": model_dir, "task": "ppo",
        "method": method or {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "ppo": {"prompts": PROMPTS, "max_new_tokens": 6, "rollout_batch_size": 16, "minibatch_size": 8,
                "ppo_epochs": 2, "kl_coef": 0.01, **(ppo or {})},
        "train": {"output_dir": str(out), "lr": 1e-2, "max_steps": 30, "log_every": 1, "progress": False,
                  "tensorboard": False, "precision": "fp32", **train_opts},
    })


def quiet(*_):
    pass


# ---- the math, by hand -------------------------------------------------------------------------------------------

def test_gae_equals_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.3, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends at t=1; its t=2 entries must not count
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: d2 = 1 - 0.1 = 0.9, d1 = 0 + 0.1 - 0.2 = -0.1, d0 = 0 + 0.2 - 0.5 = -0.3
    #        A2 = 0.9, A1 = -0.1 + 0.5 * 0.9 = 0.35, A0 = -0.3 + 0.5 * 0.35 = -0.125
    # row 2: d1 = 2 - (-1) = 3 (terminal: no bootstrap from the masked V=5), d0 = 0.3 + (-1) - 1 = -1.7
    #        A1 = 3, A0 = -1.7 + 0.5 * 3 = -0.2
    torch.testing.assert_close(adv, torch.tensor([[-0.125, 0.35, 0.9], [-0.2, 3.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.375, 0.55, 1.0], [0.8, 2.0, 0.0]]))

    # gamma < 1: A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0), summed directly
    g, lam = 0.9, 0.8
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=g, lam=lam)
    r, v = rewards[0].tolist(), values[0].tolist() + [0.0]
    deltas = [r[t] + g * v[t + 1] - v[t] for t in range(3)]
    expected = [sum((g * lam) ** l * deltas[t + l] for l in range(3 - t)) for t in range(3)]
    torch.testing.assert_close(adv[0], torch.tensor(expected))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = (torch.arange(6) < torch.tensor([[6], [4], [1]])).float()
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (to_go - values) * mask)
    torch.testing.assert_close(ret, to_go * mask)


def test_kl_penalty_per_token_and_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalty_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # kl = logp - ref on real tokens: row 1 [0.5, -1, 0], row 2 [0.1, -1, (masked)]
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.1, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.01, 0.1 - 1.0, 0.0]]))
    with pytest.raises(ValueError, match="no response token"):
        kl_penalty_rewards(torch.zeros(1), logp[:1], ref[:1], torch.zeros(1, 3), 0.1)


def test_clipped_policy_objective_clips_on_both_sides():
    # ratios 1.5, 0.5, 0.5, 1.5 against advantages +1, +1, -1, -1, eps = 0.2; the fifth token is masked out
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 7.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    logp = torch.log(ratio).requires_grad_(True)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped above), max(-0.5, -0.8) = -0.5,
    # max(0.5, 0.8) = 0.8 (clipped below), max(1.5, 1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens give no gradient; the others d/dlogp (-A r) / 4 = -A r / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]]))


def test_value_loss_clips_on_both_sides_and_can_be_off():
    old = torch.zeros(1, 5)
    values = torch.tensor([[0.5, 0.5, -0.5, -0.5, 3.0]])
    returns = torch.tensor([[1.0, 0.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # clipped values 0.2, 0.2, -0.2, -0.2: squared errors max((0.25, 0.64), (0.25, 0.04), (0.25, 0.64), (0.25, 0.04))
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.64 + 0.25) / 4)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * 0.25)


def test_whitening_entropy_logprobs_and_masks():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    torch.testing.assert_close(w, torch.tensor([[-1 / std, 0.0, 1 / std, 0.0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[2 - 1 / std, 2.0, 2 + 1 / std, 0.0]]))

    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), expected)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))

    # the first EOS (3) ends a response and is part of it; what follows is not (pad 0, or more EOS when pad == EOS)
    resp = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 3, 3, 3]])
    torch.testing.assert_close(response_mask(resp, 3), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert last_attended_index(torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]


# ---- the models: policy, reference, reward on one base -------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


def test_rollout_logprobs_and_reference_are_exact(model_dir, tmp_path):
    trainer = PPOTrainer(ppo_run(model_dir, tmp_path / "o"), reward_fn=great_fraction, log=quiet)
    lora_b = [p for n, p in trainer.peft_model.named_parameters() if "lora_B" in n]
    with torch.no_grad():  # a policy visibly different from the base
        for p in lora_b:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    roll = trainer.rollout(PROMPTS, trainer.train_ids[:4])
    seqs, P, mask = roll["seqs"], roll["prompt_len"], roll["mask"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # a fresh copy: no adapter anywhere
    for b in range(len(PROMPTS)):
        # each rollout alone, unpadded: left padding and position ids must not change a single log-probability
        n_prompt = int(roll["attn"][b, :P].sum())
        n = int(mask[b].sum())
        row = seqs[b, P - n_prompt:P + n][None]
        with torch.no_grad():
            policy = trainer.peft_model(input_ids=row).logits
            ref = base(input_ids=row).logits
        targets = row[:, n_prompt:]
        expect_policy = torch.log_softmax(policy[0, n_prompt - 1:-1], -1).gather(-1, targets[0, :, None])[:, 0]
        expect_ref = torch.log_softmax(ref[0, n_prompt - 1:-1], -1).gather(-1, targets[0, :, None])[:, 0]
        torch.testing.assert_close(roll["logp"][b, :n], expect_policy, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(roll["ref_logp"][b, :n], expect_ref, rtol=1e-4, atol=1e-5)
    assert (roll["logp"] - roll["ref_logp"]).abs().max() > 1e-2, "the policy must differ from the reference here"
    assert torch.equal(roll["values"], torch.zeros_like(roll["values"])), "the value head starts at zero"


def test_reference_does_not_move_while_the_policy_trains(model_dir, tmp_path):
    trainer = PPOTrainer(ppo_run(model_dir, tmp_path / "o", max_steps=3), reward_fn=great_fraction, log=quiet)
    torch.manual_seed(0)
    roll = trainer.rollout(PROMPTS, trainer.train_ids[:4])
    args = (roll["seqs"], roll["attn"], roll["prompt_len"])
    response = roll["seqs"][:, roll["prompt_len"]:]
    ref_before = trainer.reference_logprobs(*args)
    with torch.no_grad():
        policy_before = logprobs_from_logits(trainer._forward(*args, with_values=False)[0], response)
    base_before = {n: p.clone() for n, p in trainer.peft_model.named_parameters() if not p.requires_grad}
    for _ in range(3):
        trainer._iteration()
    with torch.no_grad():
        policy_after = logprobs_from_logits(trainer._forward(*args, with_values=False)[0], response)
    assert torch.equal(trainer.reference_logprobs(*args), ref_before)
    assert (policy_after - policy_before).abs().max() > 1e-3
    for n, p in trainer.peft_model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    """A reward adapter as `task: reward` saves one: LoRA on the seq-cls model (num_labels=1) + its score head."""
    seq = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    seq.config.pad_token_id = 0
    peft = get_peft_model(seq, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type=TaskType.SEQ_CLS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder = tmp_path_factory.mktemp("reward") / "adapter"
    peft.save_pretrained(folder)
    return str(folder), peft


def test_reward_adapter_on_the_causal_lm_scores_as_its_classifier(model_dir, reward_dir, tmp_path):
    folder, seq_peft = reward_dir
    assert "base_model.model.score.weight" in load_file(os.path.join(folder, "adapter_model.safetensors"))
    trainer = PPOTrainer(ppo_run(model_dir, tmp_path / "o", ppo={"reward_adapter": folder}), log=quiet)
    assert trainer.peft_model.active_adapters == ["policy"]
    tok = tiny_tokenizer()
    responses = [[tok.convert_tokens_to_ids(w) for w in ws.split()] for ws in
                 ["great movie", "boring plot and bad acting", "", "i loved the story"]]
    scores = trainer.score(PROMPTS, responses)
    assert trainer.peft_model.active_adapters == ["policy"]
    # the same rows through the seq-cls model + adapter: transformers reads the last non-pad token (pad 0 here)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rows = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, texts)]
    ids, attn = pad_rows([e["input_ids"] for e in encode_rows(rows, "sft", tok, DataConfig(train_file="x"))], 0,
                         left=False)
    with torch.no_grad():
        expected = seq_peft(input_ids=ids, attention_mask=attn).logits[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert scores.std() > 0.1


# ---- training ---------------------------------------------------------------------------------------------------

TINY_RUN = {"max_steps": 20, "save_every": 8, "keep_checkpoints": 1}  # 20 iterations; checkpoints 8, 16 (one kept)


@pytest.fixture(scope="module")
def tiny_run(model_dir, tmp_path_factory):
    """One tiny PPO run toward "great", shared by the tests below (the training itself and resuming from its
    checkpoint): 20 iterations of 16 rollouts, 4 updates each, ~4 s on one idle core."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    return out, train_ppo(ppo_run(model_dir, out, **TINY_RUN), reward_fn=great_fraction, log=quiet)


def test_tiny_ppo_run_raises_the_reward_and_writes_a_loadable_policy(model_dir, tiny_run):
    out, result = tiny_run
    rewards = [h["reward"] for h in result["history"]]
    assert len(rewards) == 20
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    assert result["after"]["reward"] > result["before"]["reward"] + 0.3, (result["before"], result["after"])
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert {"reward", "kl", "policy_loss", "value_loss", "clip_frac", "entropy"} <= set(train_lines[0])
    assert train_lines[-1]["kl"] > 0  # the policy moved away from the reference
    adapter = out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "README.md"):
        assert (adapter / name).is_file(), name
    assert "| reward |" in (adapter / "README.md").read_text()
    # the policy folder is a plain PEFT-layout adapter: loaded onto a fresh base it gives the trained policy
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    ids = torch.tensor([[5, 9, 12, 40]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits[0, -1].softmax(-1)[GREAT]
        with model.disable_adapter():
            plain = model(input_ids=ids).logits[0, -1].softmax(-1)[GREAT]
    assert tuned > plain + 0.1
    peft = pytest.importorskip("peft")  # HF PEFT reads the folder too (the value head file beside it is ignored)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits)
    head = load_value_head(str(adapter))
    assert head.weight.shape == (1, 32) and head.weight.abs().sum() > 0


def test_resume_reaches_the_same_policy_as_an_uninterrupted_run(model_dir, tiny_run, tmp_path, monkeypatch):
    """The shared run's last checkpoint (step 16: what a crash after it leaves) is continued in a new folder, which
    first crashes once more (before its next checkpoint) and is resumed again: the end is the uninterrupted run's."""
    straight, _ = tiny_run
    assert sorted(os.listdir(straight / "checkpoints")) == ["step-000016"]  # keep_checkpoints=1
    assert os.listdir(straight / "checkpoints" / "step-000016" / "adapter") == ["policy"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-000016", resumed / "checkpoints" / "step-000016")
    original = PPOTrainer._iteration

    def crash(self):
        if self.state.step == 17:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(PPOTrainer, "_iteration", crash)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(ppo_run(model_dir, resumed, **TINY_RUN), resume=True, reward_fn=great_fraction, log=quiet)
    monkeypatch.setattr(PPOTrainer, "_iteration", original)
    assert sorted(os.listdir(resumed / "checkpoints")) == ["step-000016"]
    result = train_ppo(ppo_run(model_dir, resumed, **TINY_RUN), resume=True, reward_fn=great_fraction, log=quiet)
    assert result["steps"] == 20
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(straight / "adapter" / name)), load_file(str(resumed / "adapter" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_prompts_from_a_data_file_with_a_held_out_split(model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": p}) + "\n" for p in PROMPTS * 3))
    run = build_run_config({"model": model_dir, "task": "ppo", "method": {"name": "lora", "r": 2},
                            "data": {"train_file": str(path), "columns": {"prompt": "question"}, "eval_fraction": 0.25},
                            "ppo": {"rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 3, "ppo_epochs": 1},
                            "train": {"output_dir": str(tmp_path / "o"), "epochs": 2, "progress": False,
                                      "tensorboard": False, "precision": "fp32"}})
    trainer = PPOTrainer(run, reward_fn=great_fraction, log=quiet)
    assert (len(trainer.train_prompts), len(trainer.eval_prompts)) == (9, 3)
    assert trainer.total_iterations == math.ceil(2 * 9 / 4)
    # iterations walk through seeded shuffles: each epoch's 9 prompts once before the next epoch's
    first_epoch = trainer._prompt_rows(0) + trainer._prompt_rows(1) + trainer._prompt_rows(2)[:1]
    assert sorted(first_epoch) == list(range(9))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    run = dataclasses.replace(run, data=DataConfig(train_file=str(bad)))
    with pytest.raises(Exception, match="column 'prompt'.*columns: 'text'"):
        PPOTrainer(run, reward_fn=great_fraction, log=quiet)


def test_chat_template_renders_the_prompts_travels_with_the_policy_and_report_to_is_honoured(model_dir, tmp_path):
    """data.chat_template (a .jinja file here) renders the prompts as sft renders a prompt row, and is saved in the
    policy adapter and its checkpoints; train.report_to reaches PPO's metrics too (mlflow: a local store)."""
    from peftlab.data.templates import ADAPTER_TEMPLATE_FILE

    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}system : {{ m['content'] }} </s> {% endfor %}"
                     "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    out = tmp_path / "o"
    raw = ppo_run(model_dir, out, max_steps=1, save_every=1, report_to=["mlflow"]).to_dict()
    raw["data"] = {"chat_template": str(jinja)}  # inline prompts: the data section holds options only
    run = build_run_config(raw)
    trainer = PPOTrainer(run, reward_fn=great_fraction, log=quiet)
    tok = trainer.tokenizer
    assert trainer.train_ids[0] == tok("system : write a review </s> <s> assistant :",
                                       add_special_tokens=False)["input_ids"]
    trainer.fit()
    assert (out / "adapter" / ADAPTER_TEMPLATE_FILE).read_text() == jinja.read_text()
    (checkpoint,) = sorted((out / "checkpoints").glob("step-*"))
    assert (checkpoint / "adapter" / ADAPTER_TEMPLATE_FILE).read_text() == jinja.read_text()
    assert (out / "mlruns").is_dir() and any((out / "mlruns").rglob("reward*")), list((out / "mlruns").rglob("*"))[:20]
    assert load_run_config(str(out / "run_config.yaml")).data.chat_template == str(jinja)  # the saved run reloads
    raw["data"] = {"train_file": "prompts.jsonl"}
    with pytest.raises(ConfigError, match="prompts twice, in ppo.prompts and from data.train_file 'prompts.jsonl'"):
        build_run_config(raw)


# ---- errors ------------------------------------------------------------------------------------------------------

def test_reward_errors_name_the_problem(model_dir, reward_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs exactly one reward.*ppo.reward_adapter"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o"), log=quiet)
    with pytest.raises(ConfigError, match="both were given"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o", ppo={"reward_adapter": reward_dir[0]}),
                   reward_fn=great_fraction, log=quiet)
    missing = tmp_path / "nope" / "adapter"
    with pytest.raises(ConfigError, match=r"no such folder.*Train the reward model first"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o", ppo={"reward_adapter": str(missing)}), log=quiet)
    # another base (same architecture, other weights) named in the reward adapter's config
    other = save_tiny(tmp_path / "other_llama", "llama", seed=1)
    with pytest.raises(ConfigError, match="trained on base model .*but this run's base"):
        PPOTrainer(ppo_run(other, tmp_path / "o", ppo={"reward_adapter": reward_dir[0]}), log=quiet)
    # an adapter without a score head is not a reward model
    sft = tmp_path / "sft_adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2)).save_pretrained(sft)
    with pytest.raises(ConfigError, match="no sequence-classification head"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o", ppo={"reward_adapter": str(sft)}), log=quiet)
    # a reward adapter for a wider model: its head (and layers) cannot fit, even with the base check off
    from transformers import LlamaConfig, LlamaForSequenceClassification

    wide = LlamaForSequenceClassification(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, num_labels=1, pad_token_id=0))
    wide_dir = tmp_path / "wide"
    get_peft_model(wide, LoraConfig(r=2, task_type=TaskType.SEQ_CLS)).save_pretrained(wide_dir)
    with pytest.raises(ConfigError, match=r"has shape \(1, 48\).*\(1, 32\)"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o", ppo={"reward_adapter": str(wide_dir),
                                                             "check_reward_base": False}), log=quiet)


@pytest.mark.parametrize("override,message", [
    ({"ppo": {"kl_coeff": 0.1}}, r"unknown key 'kl_coeff'.*Did you mean kl_coef"),
    ({"ppo": {"minibatch_size": 5}}, r"minibatch_size=5 does not divide ppo.rollout_batch_size=16.*e.g. 4"),
    ({"ppo": {"clip_range": 0}}, r"clip_range=0 is not valid"),
    ({"ppo": {"temperature": -1.0}}, r"temperature=-1.0 is not valid"),
    ({"ppo": {"lam": 1.5}}, r"lam=1.5 is not valid"),
    ({"ppo": {"prompts": []}}, r"prompts=\[\] is not valid"),
    ({"ppo": {"prompts": None}}, r"data.train_file is required.*ppo.prompts"),
    ({"task": "sft", "data": {"train_file": "x.jsonl"}}, r"the ppo section applies to task ppo"),
])
def test_bad_ppo_configs_are_refused(override, message):
    raw = {"model": "x", "task": "ppo", "method": "lora", "ppo": {"prompts": ["hi"]}}
    for key, value in override.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key == "ppo" else value
    with pytest.raises(ConfigError, match=message):
        build_run_config(raw)


def test_train_options_that_do_not_apply_to_ppo_are_refused(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.grad_accum=2 does not apply to task ppo"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o", grad_accum=2), reward_fn=great_fraction, log=quiet)
    with pytest.raises(ConfigError, match="bias='all' trains the base model's biases"):
        PPOTrainer(ppo_run(model_dir, tmp_path / "o", method={"name": "lora", "r": 2, "bias": "all"}),
                   reward_fn=great_fraction, log=quiet)


def test_a_method_that_moves_base_weights_is_stopped(model_dir, tmp_path):
    """Delta-LoRA adds its update into the frozen base weights, which the reference shares: refused after the
    first iteration that does so, naming the method."""
    run = ppo_run(model_dir, tmp_path / "o", method={"name": "delta_lora", "r": 2, "update_start_step": 0,
                                                     "target_modules": ["q_proj", "v_proj"]})
    trainer = PPOTrainer(run, reward_fn=great_fraction, log=quiet)
    with pytest.raises(ConfigError, match="delta_lora changed frozen base weights.*reference.*would drift"):
        trainer._iteration()


def test_loop_train_dispatches_ppo_and_refuses_it_without_a_reward(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs exactly one reward"):
        train(ppo_run(model_dir, tmp_path / "o"), log=quiet)


def test_demo_config_validates():
    run = load_run_config(os.path.join(REPO, "configs", "ppo_movie_reviews.yaml"))
    assert run.task == "ppo" and run.ppo.reward_adapter
    with open(os.path.join(REPO, "configs", "reward_movie_reviews.yaml")) as fh:
        reward_out = yaml.safe_load(fh)["train"]["output_dir"]
    assert os.path.normpath(run.ppo.reward_adapter) == os.path.normpath(os.path.join(reward_out, "adapter"))
    assert run.to_dict()["ppo"]["reward_adapter"] == run.ppo.reward_adapter


def test_a_reward_run_loads_and_scores_as_its_own_reward_model(model_dir, tmp_path):
    """End to end with `task: reward`: its adapter, on the causal-LM base beside the policy, gives the scores that
    preference.RewardModel (the seq-cls model the run trained) gives the same texts."""
    from peftlab.train.preference import RewardModel

    from .conftest import sentences, write_jsonl

    rows = [{"prompt": "write a review", "chosen": "great " + s, "rejected": "awful " + s} for s in sentences(16)]
    reward_out = tmp_path / "reward"
    train(build_run_config({
        "model": model_dir, "task": "reward",
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": write_jsonl(tmp_path / "pairs.jsonl", rows), "eval_fraction": 0.25, "max_length": 32},
        "train": {"output_dir": str(reward_out), "lr": 1e-2, "batch_size": 4, "max_steps": 4, "progress": False,
                  "tensorboard": False, "precision": "fp32"}}), log=quiet)
    trainer = PPOTrainer(ppo_run(model_dir, tmp_path / "o", ppo={"reward_adapter": str(reward_out)}), log=quiet)
    assert trainer.reward_data.max_length == 32  # read from the reward run's run_config.yaml
    tok = tiny_tokenizer()
    texts = ["great movie", "awful plot and bad acting", "", "i loved the story"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected = RewardModel.from_run(str(reward_out)).score(PROMPTS, texts)
    torch.testing.assert_close(trainer.score(PROMPTS, ids), expected, rtol=1e-4, atol=1e-5)
