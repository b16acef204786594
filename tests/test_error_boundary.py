"""One error boundary for every CLI entry point (issue 15): each failure a user can fix is one `peftlab CMD: error:
...` line with the fix, disk-full is named as such, `--debug` shows the traceback, user strings and regexes from
configs are bounded, and `--help` and config-file errors answer before torch is imported.

The file-level guarantees (atomic folders, locks, non-finite guards) are in tests/test_reliability.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

import peftlab.io.atomic as atomic
from peftlab import ConfigError, LoraConfig, get_peft_model
from peftlab.cli.main import main

from .conftest import tiny_llama
from .test_reliability import assert_one_line, lora, run_cli, state_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\n  task: [classify\n")
    assert_one_line(*run_cli(capsys, "train", str(bad)), "not valid YAML at line 2", "Fix the file")
    assert_one_line(*run_cli(capsys, "train", str(tmp_path / "missing.yaml")), "does not exist")
    assert_one_line(*run_cli(capsys, "train", str(tmp_path)), "not a regular file")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert_one_line(*run_cli(capsys, "train", str(tmp_path / "list.yaml")), "must hold a YAML mapping")


@pytest.mark.parametrize("override, ours", [
    ("train.learning_rate=1e-4", "'lr'"), ("train.num_train_epochs=2", "'epochs'"),
    ("train.per_device_train_batch_size=4", "'batch_size'"), ("train.gradient_accumulation_steps=2", "'grad_accum'"),
    ("method.rank=8", "'r'"), ("method.alpha=16", "'lora_alpha'")])
def test_hf_and_peft_names_are_mapped_to_ours(capsys, override, ours):
    code, err = run_cli(capsys, "train", override)
    assert_one_line(code, err, f"peftlab calls it {ours}", override.split(".")[1].split("=")[0])


def test_adapter_folder_problems_are_one_line(tmp_path, llama_dir, capsys):
    adapter = tmp_path / "adapter"
    lora(0, 4, 8).save_pretrained(adapter)
    out = str(tmp_path / "out")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "NO_SUCH_TYPE"}))
    assert_one_line(*run_cli(capsys, "merge", llama_dir, str(adapter), out), "peft_type='NO_SUCH_TYPE'")
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").mkdir()
    assert_one_line(*run_cli(capsys, "merge", llama_dir, str(adapter), out), "is a folder, not a regular file")
    (adapter / "adapter_config.json").rmdir()
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to("/dev/zero")
    assert_one_line(*run_cli(capsys, "merge", llama_dir, str(adapter), out), "is a character device")
    assert not os.path.exists(out)


@pytest.mark.parametrize("failure, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "model.safetensors"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 10880 vs 10772"), "the disk is full"),
])
def test_disk_full_is_named_and_the_old_folder_stays(tmp_path, llama_dir, capsys, failure, needle):
    adapter = tmp_path / "adapter"
    lora(0, 4, 8).save_pretrained(adapter)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")

    def full(what):
        if what.startswith("fsync"):
            raise failure

    atomic.fault_hook = full
    try:
        code, err = run_cli(capsys, "merge", llama_dir, str(adapter), str(out), "--overwrite")
    finally:
        atomic.fault_hook = None
    assert_one_line(code, err, needle, "previous content")
    assert state_of(out) == {"old.txt": hashlib.sha256(b"previous merge").hexdigest()}


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing.yaml")
    assert run_cli(capsys, "train", missing)[0] == 1
    with pytest.raises(ConfigError):
        main(["train", missing, "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "train", missing])
    monkeypatch.setenv("PEFTLAB_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", missing])


def test_huge_user_strings_are_bounded(capsys, tmp_path):
    """A 10 MB target_modules regex is refused at once (it took ~3 minutes and 1.9 GB), and no error line echoes
    megabytes."""
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"target_modules has 10,000,009 characters"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="(q_proj|" + "a" * 10_000_000 + ")"))
    assert time.perf_counter() - start < 5
    code, err = run_cli(capsys, "train", f"train.{'x' * 1_000_000}=1")
    assert_one_line(code, err, "unknown key")
    assert len(err) < 2000


def test_a_long_list_of_module_names_is_not_a_huge_regex():
    """A list is matched name by name, never compiled: an all-linear adapter saved from a large model lists every
    module's full path (Llama-70B: 560 of them, ~25,000 characters), and its own folder must load again."""
    names = [f"model.layers.{i % 2}.self_attn.q_proj" for i in range(1000)]  # 31,000 characters, 2 distinct modules
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=names))
    assert len(list(model.adapter_layers())) == 2


@pytest.mark.parametrize("text, needle", [("", r"is empty \(0 bytes\)"), ("\n\n   \n", "holds only blank lines")])
def test_empty_data_files_say_so(tmp_path, text, needle):
    from peftlab.data import DataConfig, DataError, load_splits

    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=needle):
        load_splits(DataConfig(train_file=str(path)), "classify")


# Run in a fresh interpreter where importing torch, transformers, accelerate or datasets raises: each command must
# answer (exit status, stderr) without them. Prints one JSON line per argv: [exit status, stderr, seconds].
NO_TORCH_SCRIPT = """
import contextlib, io, json, sys, time
HEAVY = ("torch", "transformers", "accelerate", "datasets")
class NoHeavy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} imported before the answer")
sys.meta_path.insert(0, NoHeavy())
from peftlab.cli.main import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException as exc:
            code = f"crash: {type(exc).__name__}: {exc}"
    print(json.dumps([code, err.getvalue(), time.perf_counter() - start]))
assert not [m for m in sys.modules if m.split(".")[0] in HEAVY]
"""


def test_help_and_config_errors_answer_before_torch_is_imported(tmp_path):
    """`peftlab --help`, `peftlab train --help`, a missing config, a YAML error, an unknown key (in train and in the
    method section), a bad value and an unknown method each answer with their one-line error while torch,
    transformers, accelerate and datasets cannot even be imported (they cost about 5 CPU-seconds; the target is an
    answer under 1 s on an idle machine)."""
    def config(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    data = "data: {train_file: rows.jsonl}\n"
    cases = [
        (["--help"], 0, None),
        (["train", "--help"], 0, None),
        (["train", str(tmp_path / "missing.yaml")], 1, "does not exist"),
        (["train", config("bad.yaml", "a: [\n")], 1, "not valid YAML"),
        (["train", config("key.yaml", data + "train: {learning_rate: 1.0e-4}\n")], 1,
         "train: unknown key 'learning_rate': peftlab calls it 'lr'"),
        (["train", config("rank.yaml", data + "method: {name: lora, rank: 8}\n")], 1,
         "method (lora): unknown key 'rank': peftlab calls it 'r'"),
        (["train", config("value.yaml", data + "method: {name: lora, r: -1}\n")], 1,
         "LoraConfig.r=-1 is not valid; it must be an integer >= 1"),
        (["train", config("lr.yaml", data + "train: {lr: -1}\n")], 1, "train.lr"),
        (["train", config("name.yaml", data + "method: {name: lroa}\n")], 1,
         "No method named 'lroa'. Did you mean lora"),
        (["train", config("dora.yaml", data + "method: {name: dora, r: 4, lora_dropout: 2}\n")], 1, "lora_dropout"),
        (["train", config("dpo.yaml", data + "task: dpo\npreference: {loss_type: hinge}\n")], 1, "loss_type"),
        (["train", config("qlora.yaml", data + "method: {name: qlora, bnb_4bit_blocksize: 48}\n")], 1,
         "bnb_4bit_blocksize=48 is not valid"),
    ]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, json.dumps([argv for argv, _, _ in cases])],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(cases)
    for (argv, want_code, needle), (code, err, _) in zip(cases, results):
        assert code == want_code, (argv, code, err[-2000:])
        if needle is not None:
            assert err.count("\n") == 1 and err.startswith("peftlab train: error: ") and needle in err, (argv, err)
