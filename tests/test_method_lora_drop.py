"""LoRA-drop: importance, selection and sharing checked against hand computations, and the two-phase `peftlab train`.

- the importance of a layer is the mean over real token positions of ||s B A x||^2, computed here from the base
  layer's own input (a forward hook on the wrapped nn.Linear) and the layer's A, B by plain matmuls;
- threshold and top_n keep the layers a hand selection (exact fractions) keeps;
- after share_layers the non-kept layers of a group hold one set of tensors, the gradients of all of them add up in
  it, and the file is a plain LoRA file (copies under every layer's keys) that HF PEFT and peftlab load;
- `peftlab train` with lora_drop runs phase 1, prints and saves the table, starts phase 2 from the pre-phase-1 values,
  trains, saves an adapter HF PEFT reproduces, and `--resume` reaches the same files;
- config and API errors say what to do.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from types import SimpleNamespace

import peft as hf
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftlab
from peftlab.cli.main import main
from peftlab.core.config import ConfigError
from peftlab.methods.lora_drop import (IMPORTANCE_FILE, LoraDropConfig, importance_table, layer_scores,
                                       select_layers, share_layers)
from peftlab.methods.lora_drop.select import token_mask
from peftlab.train import Trainer
from peftlab.train.prepare import PrepareRun

from .conftest import model_inputs, output_of, run_config, sentences, straight_and_resumed, tiny_llama
from .peft_parity import TIGHT  # PEFT's fp32 ops in the same order: equal up to matmul summation order

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


# transformers' and PEFT's notes, irrelevant here
pytestmark = pytest.mark.usefixtures("quiet_warnings", "one_thread")


def _model(targets=ALL_ATTN, **cfg):
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": targets, **cfg}
    return peftlab.get_peft_model(tiny_llama(), LoraDropConfig(**cfg))


def _layers(model):
    return [(p, m) for p, m in model.adapter_layers() if "default" in m.adapter_names]


def _padded_batches():
    g = torch.Generator().manual_seed(4)
    batches = []
    for lengths in ([9, 5, 7], [3, 8]):
        ids = torch.randint(1, 96, (len(lengths), max(lengths)), generator=g)
        mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# ---- importance ------------------------------------------------------------------------------------------------


def test_importance_is_the_mean_squared_lora_output_over_real_tokens():
    model = _model()
    batches = _padded_batches()
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in _layers(model)}
    handles = [m.base_layer.register_forward_hook(lambda mod, args, out, p=p: inputs[p].append(args[0].detach()))
               for p, m in _layers(model)]
    scores = layer_scores(model, batches)
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    expected = {}
    for path, layer in _layers(model):
        A, B = (t.detach() for t in layer.lora_pair("default"))
        s = 8 / 4  # lora_alpha / r
        total, n = 0.0, 0
        for x, mask in zip(inputs[path], masks):  # x: (batch, T, in)
            tokens = x[mask]  # real tokens only: (N, in)
            delta = s * tokens @ A.T @ B.T  # (N, out)
            total += float((delta ** 2).sum())
            n += int(mask.sum())
        expected[path] = total / n
    assert n == 9 + 5 + 7 + 3 + 8
    assert scores.keys() == expected.keys()
    for path in expected:
        assert scores[path] == pytest.approx(expected[path], rel=1e-5), path

    table = select_layers(model, batches, threshold=1.0)
    total = sum(expected.values())
    assert [r["layer"] for r in table] == sorted(expected, key=expected.get, reverse=True)
    for row in table:
        assert row["importance"] == pytest.approx(expected[row["layer"]] / total, rel=1e-5)
    assert table[-1]["cumulative"] == pytest.approx(1.0)


def test_padding_and_packed_rows_give_the_real_token_mask():
    mask = token_mask({"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])})
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    packed = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.zeros(2, 1, 6, 6),
              "seq_lens": torch.tensor([[2, 3], [4, 0]])}
    assert token_mask(packed).tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert token_mask({"input_ids": torch.zeros(1, 3, dtype=torch.long)}) is None


# ---- selection -------------------------------------------------------------------------------------------------


def _hand_keep(scores, threshold=None, top_n=None):
    """The selection by hand, in exact fractions: sort descending, then the top_n, or the shortest prefix whose
    normalised sum reaches the threshold."""
    exact = {k: Fraction(v) for k, v in scores.items()}
    total = sum(exact.values())
    order = sorted(exact, key=lambda k: -exact[k])
    if top_n is not None:
        return order[:top_n]
    running = Fraction(0)
    for i, k in enumerate(order):
        running += exact[k] / total
        if running >= Fraction(threshold).limit_denominator(1000):
            return order[: i + 1]
    return order


SCORES = {"l0.q": 2.0, "l0.v": 4.0, "l1.q": 1.0, "l1.v": 3.0}


@pytest.mark.parametrize("threshold", [0.1, 0.4, 0.5, 0.7, 0.9, 0.95, 1.0])
def test_threshold_keeps_the_shortest_prefix_reaching_it(threshold):
    table = importance_table(SCORES, threshold=threshold)
    assert [r["layer"] for r in table if r["kept"]] == _hand_keep(SCORES, threshold=threshold)
    assert [r["layer"] for r in table] == ["l0.v", "l1.v", "l0.q", "l1.q"]
    assert [r["rank"] for r in table] == [1, 2, 3, 4]
    assert [round(r["importance"], 12) for r in table] == [0.4, 0.3, 0.2, 0.1]
    assert [round(r["cumulative"], 12) for r in table] == [0.4, 0.7, 0.9, 1.0]


def test_a_threshold_reached_exactly_is_reached_despite_float_rounding():
    scores = {"a": 7.0, "b": 2.0, "c": 1.0}  # in floats 0.7 + 0.2 = 0.8999999999999999 < 0.9
    assert 0.7 + 0.2 < 0.9
    assert [r["layer"] for r in importance_table(scores, 0.9) if r["kept"]] == _hand_keep(scores, 0.9) == ["a", "b"]


@pytest.mark.parametrize("top_n", [1, 2, 3, 4, 9])
def test_top_n_keeps_the_n_most_important(top_n):
    table = importance_table(SCORES, threshold=0.1, top_n=top_n)  # top_n wins over threshold
    assert [r["layer"] for r in table if r["kept"]] == _hand_keep(SCORES, top_n=top_n)


def test_ties_keep_model_order():
    table = importance_table({"first": 1.0, "second": 1.0, "third": 2.0}, top_n=2)
    assert [r["layer"] for r in table if r["kept"]] == ["third", "first"]


# ---- sharing ---------------------------------------------------------------------------------------------------


KEEP = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]


def _copy_groups_into(reference, groups):
    """Give every member of each group in `reference` (an unshared model) the owner's values."""
    layers = dict(_layers(reference))
    with torch.no_grad():
        for owner, members in groups.items():
            A, B = layers[owner].lora_pair("default")
            for m in members:
                for t, v in zip(layers[m].lora_pair("default"), (A, B)):
                    t.copy_(v)


def test_shared_layers_hold_one_set_of_tensors_and_their_gradients_add_up():
    model = _model()
    groups = share_layers(model, KEEP)
    L = "model.layers.{}.self_attn.{}"
    assert groups == {L.format(1, "q_proj"): [L.format(1, "q_proj")],
                      L.format(0, "k_proj"): [L.format(0, "k_proj"), L.format(1, "k_proj")],
                      L.format(0, "v_proj"): [L.format(0, "v_proj"), L.format(1, "v_proj")],
                      L.format(0, "o_proj"): [L.format(0, "o_proj")]}
    layers = dict(_layers(model))
    for owner, members in groups.items():
        for m in members:
            for mine, theirs in zip(layers[m].lora_pair("default"), layers[owner].lora_pair("default")):
                assert mine is theirs, (m, owner)
    assert layers[KEEP[0]].lora_A["default"] is not layers[L.format(1, "q_proj")].lora_A["default"]
    tensors = model.adapter_tensors("default")
    assert len(tensors) == 2 * 8, "the file still lists A and B under every layer's keys"
    unique = {id(t): t for t in model.trainable_tensors("default").values()}
    # A (4, 32) + B (out, 4); hidden 32, k/v out 16 (2 of 4 heads of size 8)
    per_pair = {"q_proj": 4 * 32 + 32 * 4, "k_proj": 4 * 32 + 16 * 4, "v_proj": 4 * 32 + 16 * 4,
                "o_proj": 4 * 32 + 32 * 4}
    # kept: layers.0.q, layers.1.o; groups: layers.1.q alone, k (2 -> 1 pair), v (2 -> 1 pair), layers.0.o alone
    assert sum(t.numel() for t in unique.values()) == (per_pair["q_proj"] * 2 + per_pair["o_proj"] * 2
                                                       + per_pair["k_proj"] + per_pair["v_proj"])
    groups_params = [p for g in model.optimizer_param_groups(1e-3) for p in g["params"]]
    assert len(groups_params) == len({id(p) for p in groups_params}) == len(unique), "each tensor reaches AdamW once"

    # The same function without sharing: every member holds a copy of its owner's values.
    reference = _model()
    _copy_groups_into(reference, groups)
    x = model_inputs("llama")
    for m in (model, reference):
        m.train()
        m(**x, labels=x["input_ids"]).loss.backward()
    torch.testing.assert_close(output_of(model, x), output_of(reference, x), rtol=0, atol=0)
    ref_layers = dict(_layers(reference))
    for owner, members in groups.items():
        for i in range(2):  # A, then B
            shared_grad = layers[owner].lora_pair("default")[i].grad
            summed = sum(ref_layers[m].lora_pair("default")[i].grad for m in members)
            torch.testing.assert_close(shared_grad, summed, rtol=1e-5, atol=1e-7)
    for kept in KEEP:
        for i in range(2):
            torch.testing.assert_close(layers[kept].lora_pair("default")[i].grad,
                                       ref_layers[kept].lora_pair("default")[i].grad, rtol=1e-5, atol=1e-7)


def test_shared_model_merges_and_saves_a_plain_lora_file(tmp_path):
    model = _model()
    groups = share_layers(model, KEEP)
    x = model_inputs("llama")
    expected = output_of(model, x)
    model.merge_adapter()  # each member adds s B_g A_g into its own base weight (tolerance as in test_conformance)
    torch.testing.assert_close(output_of(model, x), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()

    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA"
    assert not {"threshold", "top_n", "sample_ratio", "sample_steps"} & set(config), "file is plain LoRA"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 16
    for owner, members in groups.items():
        for m in members:
            for ab in ("lora_A", "lora_B"):
                assert torch.equal(tensors[f"base_model.model.{m}.{ab}.weight"],
                                   tensors[f"base_model.model.{owner}.{ab}.weight"])
    back = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert back.method_of("default").name == "lora", "a loaded file is ordinary LoRA"
    torch.testing.assert_close(output_of(back, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(output_of(hf.PeftModel.from_pretrained(tiny_llama(), tmp_path), x), expected, **TIGHT)


# ---- `peftlab train` -------------------------------------------------------------------------------------------


def _method(**extra):
    return {"name": "lora_drop", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"],
            "sample_steps": 3, "threshold": 0.5, **extra}


def _corpus(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(sentences(40)))
    return str(txt)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["split"] == "train"]


def test_peftlab_train_runs_both_phases_and_the_adapter_loads_in_peft(llama_dir, tmp_path, capsys):
    txt = _corpus(tmp_path)
    out = tmp_path / "run"
    printed: list[str] = []
    trainer = Trainer(run_config(llama_dir, "causal_lm", txt, out, _method()), log=printed.append)

    report = json.load(open(out / IMPORTANCE_FILE))
    rows = report["layers"]
    assert len(rows) == 6 and report["phase1"]["steps"] == 3 and report["phase1"]["rows"] == 12
    assert [r["layer"] for r in rows if r["kept"]] == _hand_keep({r["layer"]: r["score"] for r in rows}, 0.5)
    assert sum(r["importance"] for r in rows) == pytest.approx(1.0)
    text = "\n".join(printed)
    assert "LoRA-drop layer importance" in text and all(r["layer"] in text for r in rows)
    by_path = dict(_layers(trainer.peft_model))
    for row in rows:
        if row["kept"]:
            continue
        owner = row["shares_pair_of"]
        assert by_path[row["layer"]].lora_A["default"] is by_path[owner].lora_A["default"]
    assert report["trainable_params"] < report["trainable_params_plain_lora"] == report["file_params"]
    assert trainer.peft_model.get_nb_trainable_parameters()[0] == report["trainable_params"]

    # Phase 1 ran in the constructor; phase 2 starts from the values plain LoRA starts from with the same seed: each
    # kept layer's own initial pair, each group its first member's initial pair.
    plain_method = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    plain = Trainer(run_config(llama_dir, "causal_lm", txt, tmp_path / "plain", plain_method), log=lambda *_: None)
    plain_layers = dict(_layers(plain.peft_model))
    for row in rows:
        A, B = by_path[row["layer"]].lora_pair("default")
        assert torch.count_nonzero(B) == 0, row["layer"]
        pair_owner = row["layer"] if row["kept"] else row["shares_pair_of"]
        assert torch.equal(A, plain_layers[pair_owner].lora_pair("default")[0]), row["layer"]

    result = trainer.fit()
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert result["after"]["loss"] < result["before"]["loss"]
    card = open(out / "adapter" / "README.md").read()
    assert "## LoRA-drop layer selection" in card and rows[0]["layer"] in card

    config = json.load(open(out / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and "threshold" not in config
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for row in rows:
        if not row["kept"]:
            for ab in ("lora_A", "lora_B"):
                assert torch.equal(tensors[f"base_model.model.{row['layer']}.{ab}.weight"],
                                   tensors[f"base_model.model.{row['shares_pair_of']}.{ab}.weight"])
    x = model_inputs("llama")
    expected = output_of(trainer.peft_model.eval(), x)
    base = lambda: transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()  # noqa: E731
    assert not torch.allclose(expected, output_of(base(), x), atol=1e-4)
    back = peftlab.PeftModel.from_pretrained(base(), out / "adapter")
    torch.testing.assert_close(output_of(back, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(output_of(hf.PeftModel.from_pretrained(base(), out / "adapter"), x), expected, **TIGHT)

    # `peftlab eval` builds the run without phase 1 (the file holds its outcome) and gets the run's final metrics.
    written = os.path.getmtime(out / IMPORTANCE_FILE)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["loss"] == pytest.approx(result["after"]["loss"], rel=1e-6)
    assert os.path.getmtime(out / IMPORTANCE_FILE) == written, "eval must not run phase 1 again"


def test_resume_repeats_the_selection_and_reaches_the_same_files(llama_dir, tmp_path, monkeypatch):
    txt = _corpus(tmp_path)
    method = _method(top_n=2, lora_dropout=0.1)
    straight, broken, _ = straight_and_resumed(
        lambda out: run_config(llama_dir, "causal_lm", txt, out, method, save_every=3), tmp_path, monkeypatch)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert json.load(open(straight / IMPORTANCE_FILE))["layers"] == json.load(open(broken / IMPORTANCE_FILE))["layers"]


def test_classification_samples_are_stratified_by_label():
    examples = [{"label": 0}] * 30 + [{"label": 1}] * 10 + [{"label": 2}] * 2
    trainer = SimpleNamespace(train_examples=examples, global_batch=4, task=SimpleNamespace(classifies=True),
                              cfg=SimpleNamespace(seed=3, output_dir="unused"),
                              accelerator=SimpleNamespace(is_main_process=True, device=torch.device("cpu")))
    run = PrepareRun(trainer)
    rows = run.sample_rows(8)
    labels = [examples[i]["label"] for i in rows]
    # exact shares 8 x 30/42 = 5.71, 8 x 10/42 = 1.90, 8 x 2/42 = 0.38: floors 5, 1, 0, the two largest remainders
    # (0.90, 0.71) get the last two
    assert (labels.count(0), labels.count(1), labels.count(2)) == (6, 2, 0)
    assert rows == sorted(set(rows)) and rows == run.sample_rows(8), "distinct, ascending, reproducible"


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,message", [
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not valid for LoRA-drop.*True, 'gaussian'"),
    ({"threshold": 0}, r"threshold=0 is not valid"),
    ({"threshold": 1.5}, r"threshold=1.5 is not valid"),
    ({"top_n": 0}, r"top_n=0 is not valid"),
    ({"sample_ratio": 0}, r"sample_ratio=0 is not valid"),
    ({"sample_steps": 0}, r"sample_steps=0 is not valid"),
])
def test_config_errors_say_what_to_do(options, message):
    with pytest.raises(ConfigError, match=message):
        LoraDropConfig(**options)


def test_api_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="lora_drop cannot adapt.*Linear"):
        peftlab.get_peft_model(tiny_llama(), LoraDropConfig(target_modules=["embed_tokens", "q_proj"]))
    fresh = _model(init_lora_weights=True)  # B = 0: nothing to rank yet
    with pytest.raises(ValueError, match="LoRA output was zero.*Train the adapter"):
        select_layers(fresh, _padded_batches())
    with pytest.raises(ValueError, match="batches` was empty"):
        layer_scores(fresh, [])
    model = _model()
    with pytest.raises(ValueError, match="not a layer of adapter 'default'.*model.layers.0.self_attn.q_proj"):
        share_layers(model, ["q_proj"])
    share_layers(model, KEEP)
    with pytest.raises(ValueError, match="already shares"):
        share_layers(model, KEEP)
    dora = peftlab.get_peft_model(tiny_llama(), peftlab.DoraConfig(r=2))
    with pytest.raises(TypeError, match="plain LoRA linear layers.*DoraLinear"):
        layer_scores(dora, _padded_batches())
