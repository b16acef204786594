"""Nothing lost, nothing silently wrong (issue 15): each guarantee in README's "What peftlab guarantees", tested.

- Folder writes are all-or-nothing: a kill at any instant of a save leaves the complete old folder or the complete
  new one, for adapter folders, merged model folders, checkpoints and compare outputs. Proven by fault injection
  at every step a write makes on disk (io/atomic.py's `fault_hook`): the disk is snapshotted there, as a kill would
  leave it, and each snapshot is read back as the next process would read it.
- Config and weights that were not saved together are refused; so are NaN/inf weights (unless allowed).
- Adapter names are one path component; a base model is wrapped by one PeftModel at a time.
- (One run per output folder and the non-finite guards: tests/test_run_guards.py.)
- (The one-line error boundary of every CLI command: tests/test_error_boundary.py.)

Models are the tiny ones of tests/conftest.py; nothing is downloaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import peftlab.io.atomic as atomic
from peftlab import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from peftlab.cli.main import main
from peftlab.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

from .conftest import model_inputs, output_of, sentences, tiny_llama, tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers -----------------------------------------------------------------------------------------------------

def state_of(folder) -> dict[str, str] | None:
    """{relative path: sha256} of every file under `folder` (None if there is no folder). Hidden temporaries of
    io/atomic.py are left out: no loader reads them."""
    if not os.path.isdir(folder):
        return None
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if atomic.TEMP_MARK not in d]
        for name in files:
            if atomic.TEMP_MARK in name or ".tmp-" in name:
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


class Snapshots:
    """fault_hook that copies `root` at every step of a write: the disk as a kill at that instant leaves it."""

    def __init__(self, root, into) -> None:
        self.root, self.into, self.paths, self.steps = str(root), str(into), [], []

    def __call__(self, what: str) -> None:
        path = os.path.join(self.into, f"{len(self.paths):03d}")
        shutil.copytree(self.root, path, symlinks=True)
        self.paths.append(path)
        self.steps.append(what)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_stale_temporaries(target) -> None:
    """What an earlier save killed half way leaves beside `target`: a staging folder and a backup, both owned by a
    process that is gone. They must be ignored and cleaned, never taken for the folder."""
    head, base = os.path.split(str(target))
    pid = dead_pid()
    for kind in ("new", "old"):
        junk = os.path.join(head, f".{base}{atomic.TEMP_MARK}{kind}-{pid}-0000beef")
        os.makedirs(junk)
        with open(os.path.join(junk, "adapter_config.json"), "w") as fh:
            fh.write("{half")


def lora(seed: int, r: int, alpha: int, targets=("q_proj", "v_proj")) -> PeftModel:
    base = tiny_llama()
    torch.manual_seed(seed)  # after the base (built from seed 0): the adapter's own weights differ by seed
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                   init_lora_weights=False))


@pytest.fixture(params=[True, False], ids=["exchange", "two-renames"])
def swap_mode(request, monkeypatch):
    """Both ways of swapping a folder in: renameat2(RENAME_EXCHANGE), and the two-rename fallback."""
    monkeypatch.setattr(atomic, "use_exchange", request.param)
    return request.param


def kill_everywhere(tmp_path, root, write, read_back) -> tuple[tuple, tuple, list[str]]:
    """Run `write()` once with a snapshot at every step; return (states before, states after, the steps).
    `read_back(root)` recovers as a loader would and returns the state of each folder that is one unit (an adapter
    save writes each adapter's folder as one); in every snapshot each unit must be in its old or its new state."""
    before = read_back(str(root))
    snaps = Snapshots(root, tmp_path / "snaps")
    atomic.fault_hook = snaps
    try:
        write()
    finally:
        atomic.fault_hook = None
    after = read_back(str(root))
    assert after != before and after is not None
    assert len(snaps.paths) >= 4, snaps.steps
    for path, step in zip(snaps.paths, snaps.steps):
        for unit, (seen, old, new) in enumerate(zip(read_back(path), before, after)):
            assert seen in (old, new), f"killed at {step!r}: folder {unit} holds neither its old nor its new content"
    return before, after, snaps.steps


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    """Exit status 1 and one `peftlab CMD: error: ...` line, the last on stderr (transformers may draw a progress
    bar before it), no traceback."""
    assert code == 1, err
    line = err.rstrip("\n").split("\n")[-1]
    assert line.startswith("peftlab ") and ": error: " in line and "Traceback" not in err, err
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"


# ---- 1. folders: old or new at every instant ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_kill_during_adapter_save_leaves_old_or_new_adapter(tmp_path, swap_mode, seed):
    """save_pretrained over an existing adapter, killed at every step. Randomised: the change is a scaling field
    only (same shapes: the mixed folder used to load silently with the wrong scaling) or the rank; a second adapter
    in a subfolder, a user's README beside the files, stale temporaries of an earlier kill."""
    rng = random.Random(seed)
    root = tmp_path / "root"
    folder = root / "adapter"
    old_r, new_r = 4, rng.choice([4, 8])
    new_alpha = 8 if new_r != old_r else rng.choice([16, 32])
    old = lora(seed, old_r, 8)
    new = lora(seed + 100, new_r, new_alpha)
    if rng.random() < 0.5:
        old.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
        new.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], init_lora_weights=False))
    old.save_pretrained(folder)
    (folder / "README.md").write_text("the user's notes")
    if rng.random() < 0.5:
        plant_stale_temporaries(folder)

    def read_back(r):
        units = []
        for sub in ("adapter", "adapter/second"):  # each adapter's folder is one unit
            atomic.recover_folder(os.path.join(r, sub))  # what resolve_adapter_dir runs first for every loader
            state = state_of(os.path.join(r, sub))
            units.append(state and {k: v for k, v in state.items() if not k.startswith("second/")})
        return tuple(units)

    kill_everywhere(tmp_path, root, lambda: new.save_pretrained(folder), read_back)
    assert (folder / "README.md").read_text() == "the user's notes"
    assert not [n for n in os.listdir(root) if atomic.TEMP_MARK in n], "stale temporaries left beside the folder"
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(output_of(loaded, model_inputs("llama")), output_of(new, model_inputs("llama")),
                               rtol=0, atol=0)


def test_kill_during_merged_model_save_leaves_old_or_new_folder(tmp_path, swap_mode):
    from peftlab.cli.merge_cmd import save_merged

    root = tmp_path / "root"
    out = str(root / "merged")
    tokenizer = tiny_tokenizer()
    save_merged(lora(0, 4, 8).merge_and_unload(), tokenizer, out)
    new = lora(1, 4, 16).merge_and_unload()
    kill_everywhere(tmp_path, root, lambda: save_merged(new, tokenizer, out),
                    lambda r: (atomic.recover_folder(os.path.join(r, "merged")), state_of(os.path.join(r, "merged")))[1:])


def test_kill_during_checkpoint_save_and_pruning_never_lists_a_partial_checkpoint(tmp_path, swap_mode):
    """A rerun saves step 2 again (replacing it whole) and prunes step 1 (keep=1). At every instant, the checkpoints
    --resume would list are complete: each one is the old or the new step-2, or the intact step-1."""
    root = tmp_path / "root"
    ckpts = str(root / "checkpoints")
    model = lora(0, 4, 8)
    save_checkpoint(ckpts, 1, model, {"step": 1}, keep=5)
    save_checkpoint(ckpts, 2, model, {"step": 2}, keep=5)
    rerun = lora(1, 4, 8)

    def read_back(r):
        found = list_checkpoints(os.path.join(r, "checkpoints"))  # recovers, as --resume does
        return tuple(json.dumps(state_of(f), sort_keys=True) for f in found)

    before = read_back(str(root))
    known = set(before)  # the intact step-1 and the old step-2
    snaps = Snapshots(root, tmp_path / "snaps")
    atomic.fault_hook = snaps
    try:
        save_checkpoint(ckpts, 2, rerun, {"step": 2, "rerun": True}, keep=1)
    finally:
        atomic.fault_hook = None
    after = read_back(str(root))
    known.add(after[-1])
    assert len(after) == 1 and len(snaps.paths) >= 6
    for path, step in zip(snaps.paths, snaps.steps):
        listed = read_back(path)
        assert listed and all(s in known for s in listed), f"killed at {step!r}: a partial checkpoint is listed"
        assert listed[-1] in (before[-1], after[-1]), f"killed at {step!r}: the newest checkpoint is neither"
    fresh = lora(2, 4, 8)
    assert load_checkpoint(list_checkpoints(ckpts)[-1], fresh)["rerun"] is True


def test_kill_during_compare_report_leaves_the_old_or_the_new_report_whole(tmp_path, swap_mode):
    """`peftlab compare`'s table, plots and config as run are one set: rewritten with new results and killed at every
    step, report/ holds the whole old set or the whole new one, never a new table beside an old plot."""
    from peftlab.compare import build_compare_config
    from peftlab.compare.runner import REPORT_FILES, write_outputs

    root = tmp_path / "cmp"
    config = build_compare_config({
        "model": "unused", "task": "classify", "data": {"train_file": str(tmp_path / "d.jsonl")},
        "train": {"output_dir": str(root)}, "methods": [{"name": "lora", "method": {"name": "lora"}}]})
    result = {"label": "lora", "method": "lora", "status": "ok", "trainable_params": 10, "all_params": 100,
              "after": {"accuracy": 0.5, "loss": 0.7}, "wall_seconds": 1.0}
    write_outputs(config, [result])
    assert sorted(os.listdir(root / "report")) == sorted(REPORT_FILES)
    result = {**result, "after": {"accuracy": 0.9, "loss": 0.2}, "trainable_params": 20}

    def read_back(r):
        atomic.recover_folder(os.path.join(r, "report"))
        return (state_of(os.path.join(r, "report")),)

    before, after, _ = kill_everywhere(tmp_path, root, lambda: write_outputs(config, [result]), read_back)
    assert all(before[0][n] != after[0][n] for n in ("results.md", "results.csv", "score_vs_params.png"))


def _features_classifier(seed: int, labels):
    from peftlab import FeaturesConfig
    from peftlab.methods.features import fit_probe
    from peftlab.methods.features.run import FeaturesClassifier

    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(12, 4, generator=g), torch.arange(12) % len(labels)
    return FeaturesClassifier(FeaturesConfig(pooling="mean", C=0.5 + seed), fit_probe(X, y, labels), None, None,
                              "unused")


def _icl_classifier(seed: int, labels):
    from peftlab import IclConfig
    from peftlab.methods.icl import IclClassifier

    pool = [(s, labels[i % len(labels)]) for i, s in enumerate(sentences(6, seed=seed))]
    return IclClassifier(IclConfig(k=seed % 2 * 2, seed=seed), labels, None, tiny_tokenizer(), pool=pool)


@pytest.mark.parametrize("make", [_features_classifier, _icl_classifier], ids=["features", "icl"])
def test_kill_during_features_or_icl_save_leaves_old_or_new_folder(tmp_path, swap_mode, make):
    """features and icl folders (config + probe/labels/demonstrations) are written as one folder: killed at every
    step of a save over an older one (other labels, other options; icl: a k=2 save over a k=0 one), the folder is the
    old or the new one; the user's README is carried over and the load reads the new one."""
    from peftlab.methods import features, icl

    root = tmp_path / "root"
    folder = root / "saved"
    make(0, ["neg", "pos"]).save_pretrained(str(folder))
    (folder / "README.md").write_text("the user's notes")
    new = make(1, ["a", "b", "c"])

    def read_back(r):
        atomic.recover_folder(os.path.join(r, "saved"))
        return (state_of(os.path.join(r, "saved")),)

    kill_everywhere(tmp_path, root, lambda: new.save_pretrained(str(folder)), read_back)
    assert (folder / "README.md").read_text() == "the user's notes"
    loader = features.load if make is _features_classifier else icl.load
    assert loader(str(folder), model=tiny_llama(), tokenizer=tiny_tokenizer()).labels == ["a", "b", "c"]


def test_a_failing_write_keeps_the_old_folder_and_leaves_no_temporaries(tmp_path, swap_mode):
    """A write that fails (disk full, at a random step) is not a kill: the old adapter stays, and the staging
    folder is removed."""
    folder = tmp_path / "adapter"
    old = lora(0, 4, 8)
    old.save_pretrained(folder)
    before = state_of(folder)
    new = lora(1, 4, 32)
    count = []
    atomic.fault_hook = count.append
    new.save_pretrained(tmp_path / "probe")
    steps = len(count)
    for k in random.Random(0).sample(range(steps), min(steps, 5)):
        calls = []

        def fail(what, k=k, calls=calls):
            calls.append(what)
            if len(calls) == k + 1:
                raise OSError(errno.ENOSPC, "No space left on device", "adapter_model.safetensors")

        atomic.fault_hook = fail
        try:
            new.save_pretrained(folder)
        except OSError:
            pass
        finally:
            atomic.fault_hook = None
        assert state_of(folder) in (before, state_of(tmp_path / "probe")), calls[-1]
        assert not [n for n in os.listdir(tmp_path) if atomic.TEMP_MARK in n]
        if state_of(folder) != before:  # failed after the swap (deleting the old copy): new is complete
            old.save_pretrained(folder)


# ---- 2. config and weights belong together; non-finite weights ----------------------------------------------------

def test_config_from_another_save_is_refused_even_with_the_same_shapes(tmp_path):
    """The old failure: new weights beside an old config (only lora_alpha differs) loaded silently, wrong scaling."""
    a, b = tmp_path / "a", tmp_path / "b"
    lora(0, 4, 8).save_pretrained(a)
    lora(1, 4, 32).save_pretrained(b)
    shutil.copy(a / "adapter_config.json", b / "adapter_config.json")
    with pytest.raises(AdapterFileError, match=r"does not match the config adapter_model\.safetensors was saved with "
                                               r"\(lora_alpha: config 8 vs weights saved with 32\)"):
        PeftModel.from_pretrained(tiny_llama(), b)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "elsewhere/model"  # where the base comes from: not checked
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    PeftModel.from_pretrained(tiny_llama(), a)


def nan_adapter(folder):
    model = lora(0, 4, 8)
    with torch.no_grad():
        next(iter(model.trainable_tensors("default").values())).fill_(float("nan"))
    model.save_pretrained(folder)
    return model


def test_non_finite_adapter_weights_are_refused_unless_allowed(tmp_path):
    model = nan_adapter(tmp_path / "nan")
    with pytest.raises(AdapterFileError, match=r"hold NaN or inf values.*allow_non_finite=True"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nan")
    base = tiny_llama()
    with pytest.raises(AdapterFileError, match="NaN or inf"):
        lora(1, 4, 8).load_adapter(tmp_path / "nan", "other")
    loaded = PeftModel.from_pretrained(base, tmp_path / "nan", allow_non_finite=True)
    assert torch.isnan(next(iter(loaded.trainable_tensors("default").values()))).all()
    with pytest.raises(AdapterFileError, match=r"adapter 'default'.*NaN or inf"):
        model.merge_and_unload()
    merged = model.merge_and_unload(allow_non_finite=True)
    assert not all(torch.isfinite(p).all() for p in merged.parameters())


def test_merge_command_refuses_a_nan_adapter_in_one_line(tmp_path, llama_dir, capsys):
    nan_adapter(tmp_path / "nan")
    code = main(["merge", llama_dir, str(tmp_path / "nan"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert_one_line(code, err, "NaN or inf")
    assert not (tmp_path / "out").exists()


# ---- 3. adapter names, wrapped bases ------------------------------------------------------------------------------

BAD_NAMES = ["/tmp/outside", "../up", "a/b", "a\\b", "", "x" * 101, "a\x00b", "..", "line\nbreak"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:12])
def test_adapter_names_are_one_path_component_everywhere(tmp_path, name):
    saved = tmp_path / "saved"
    lora(0, 4, 8).save_pretrained(saved)
    model = lora(0, 4, 8)
    calls = {
        "add_adapter": lambda: model.add_adapter(name, LoraConfig(r=2)),
        "get_peft_model": lambda: get_peft_model(tiny_llama(), LoraConfig(r=2), adapter_name=name),
        "load_adapter": lambda: model.load_adapter(saved, name),
        "from_pretrained": lambda: PeftModel.from_pretrained(tiny_llama(), saved, adapter_name=name),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match=r"Adapter name .* is not valid"):
            call()
    assert list(model.peft_config) == ["default"]
    model.peft_config[name] = model.peft_config["default"]  # bypassing add_adapter: save still refuses
    with pytest.raises(ValueError, match=r"Adapter name .* is not valid"):
        model.save_pretrained(tmp_path / "out", selected_adapters=[name])
    assert not os.path.exists("/tmp/outside/adapter_config.json") and not (tmp_path / "up").exists()


def test_get_peft_model_on_an_already_wrapped_base_names_add_adapter():
    """PEFT only warns ("modify a model with PEFT for a second time") and replaces the first wrapper's adapter in
    the shared layers; peftlab refuses, and the first model is unchanged."""
    base = tiny_llama()
    first = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
    expected = output_of(first, model_inputs("llama"))
    with pytest.raises(ValueError, match=r"already wrapped by a PeftModel.*add_adapter\(name, config\)"):
        get_peft_model(base, LoraConfig(r=8))
    with pytest.raises(ValueError, match="already wrapped"):
        get_peft_model(base, __import__("peftlab").BitFitConfig())  # a layer-free method: the mark, not the layers
    torch.testing.assert_close(output_of(first, model_inputs("llama")), expected, rtol=0, atol=0)
    plain = first.unload()
    get_peft_model(plain, LoraConfig(r=2))  # handed back: may be wrapped again


def test_saving_into_the_working_folder_replaces_files_and_a_mixed_pair_is_refused(tmp_path, monkeypatch):
    """save_pretrained(".") cannot swap the folder this process stands in: each file is replaced whole, and if a
    kill falls between the two, the loader refuses the pair instead of loading it."""
    monkeypatch.chdir(tmp_path)
    lora(0, 4, 8).save_pretrained(".")
    new = lora(1, 4, 32)
    steps = []

    def die_after_weights(what):
        steps.append(what)
        if what == "write adapter_config.json":
            raise KeyboardInterrupt  # the weights are in place, the config is the old one

    atomic.fault_hook = die_after_weights
    try:
        with pytest.raises(KeyboardInterrupt):
            new.save_pretrained(".")
    finally:
        atomic.fault_hook = None
    assert os.getcwd() == str(tmp_path)
    with pytest.raises(AdapterFileError, match="lora_alpha: config 8 vs weights saved with 32"):
        PeftModel.from_pretrained(tiny_llama(), ".")
    new.save_pretrained(".")
    PeftModel.from_pretrained(tiny_llama(), ".")
