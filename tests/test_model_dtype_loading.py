"""The base model's dtype (auto | bf16 | fp16 | fp32) and the streaming loader (peftlab/models/dtype.py, loading.py).

Invariants: each dtype lands where asked and trainable tensors stay fp32; the streamed model equals transformers'
from_pretrained tensor for tensor and output for output (one file or shards, with or without a head); loading never
holds an fp32 copy of a bf16 model (peak RSS of a subprocess); QLoRA quantised at load holds the same NF4 tensors as
quantising after a full load, and its files load in HF PEFT; pickled checkpoints are refused unread; `auto` follows
the hardware's flags."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM)

from peftlab import LoraConfig, get_peft_model
from peftlab.models import CheckpointFormatError, DtypeError, load_model, resolve_dtype
from peftlab.models import dtype as dtype_mod

from .conftest import sentences, tiny_llama, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("quiet_warnings")  # transformers' notes on loading and init

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama with tied embeddings, saved as one file and as 8+ shards (max_shard_size)."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="10KB")
    # untied, with biases (for BitFit)
    LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, attention_bias=True)).save_pretrained(
        root / "untied")
    assert os.path.isfile(root / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(root / "sharded") if f.endswith(".safetensors")]) >= 8
    return root


IDS = torch.randint(1, 96, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("folder", ["single", "sharded", "untied"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_causal_lm_equals_from_pretrained(ckpt, folder, dtype):
    ours = load_model(str(ckpt / folder), dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(ckpt / folder, dtype=DT[dtype])
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for key in ref_sd:
        assert ours_sd[key].dtype == ref_sd[key].dtype and torch.equal(ours_sd[key], ref_sd[key]), key
    for (name, ours_buf), (_, ref_buf) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
        assert ours_buf.dtype == ref_buf.dtype and torch.equal(ours_buf, ref_buf), name  # rotary inv_freq (computed)
    assert {p.dtype for p in ours.parameters()} == {DT[dtype]}
    tied = ours.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert not ours.training
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)
        assert torch.equal(ours.generate(IDS[:1], max_new_tokens=4, do_sample=False),
                           ref.generate(IDS[:1], max_new_tokens=4, do_sample=False))


def test_streamed_base_and_new_head(ckpt):
    """A causal LM checkpoint read into AutoModel (prefix dropped) and into a classifier (new head initialised by the
    model's own rule, every loaded tensor untouched)."""
    bare = load_model(str(ckpt / "sharded"), AutoModel, dtype="bf16")
    ref = AutoModel.from_pretrained(ckpt / "sharded", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(bare(IDS).last_hidden_state, ref(IDS).last_hidden_state)
    cls = load_model(str(ckpt / "sharded"), AutoModelForSequenceClassification, dtype="bf16", num_labels=3)
    ref = AutoModelForSequenceClassification.from_pretrained(ckpt / "sharded", dtype=torch.bfloat16, num_labels=3)
    for key, value in ref.model.state_dict().items():
        assert torch.equal(cls.model.state_dict()[key], value), key
    head = cls.score.weight
    assert head.shape == (3, 32) and head.dtype == torch.bfloat16 and cls.config.num_labels == 3
    assert 0.1 < head.float().std().item() < 0.3  # initializer_range 0.2, not torch.empty's garbage


def test_each_dtype_lands_where_asked_and_is_announced(ckpt, monkeypatch):
    monkeypatch.setattr(dtype_mod, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_fp16"}))
    lines = []
    for name in ("fp32", "bf16", "fp16"):
        model = load_model(str(ckpt / "single"), dtype=name, log=lines.append)
        assert {p.dtype for p in model.parameters()} == {DT[name]} and model.config.dtype == DT[name]
    auto = load_model(str(ckpt / "single"), dtype="auto", log=lines.append)
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert lines[-1] == "peftlab: base in bf16 (auto: CPU has avx512_bf16)"
    assert lines[0] == "peftlab: base in fp32 (asked)"


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, want, why in [({"avx512_bf16"}, torch.bfloat16, "auto: CPU has avx512_bf16"),
                             ({"amx_bf16", "amx_tile"}, torch.bfloat16, "auto: CPU has amx_bf16"),
                             ({"avx2", "avx512f"}, torch.float32, "auto: CPU has no avx512_bf16 / amx_bf16")]:
        monkeypatch.setattr(dtype_mod, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert resolve_dtype("auto") == (want, why)
    # fp16 without native fp16 on the CPU: refused (torch emulates it, ~50x slower); with avx512_fp16: fine
    with pytest.raises(DtypeError, match="no native fp16.*Use dtype bf16 or fp32"):
        resolve_dtype("fp16")
    monkeypatch.setattr(dtype_mod, "cpu_flags", lambda: frozenset({"avx512_fp16"}))
    assert resolve_dtype("fp16")[0] == torch.float16
    # a CUDA GPU without bf16 (compute capability < 8.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert resolve_dtype("auto") == (torch.float32, "auto: this CUDA GPU has no bf16")
    with pytest.raises(DtypeError, match="Tesla T4.*cannot compute bf16.*use dtype fp16 or fp32"):
        resolve_dtype("bf16")
    with pytest.raises(DtypeError, match="'bf8' is not one of auto, bf16, fp16, fp32"):
        resolve_dtype("bf8")


def test_bad_dtype_fails_before_reading_weights(ckpt, monkeypatch):
    monkeypatch.setattr(dtype_mod, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from peftlab.models import loading

    monkeypatch.setattr(loading, "checkpoint_files", lambda folder: pytest.fail("weights were looked at"))
    with pytest.raises(DtypeError):
        load_model(str(ckpt / "single"), dtype="fp16")


@pytest.mark.parametrize("method", [
    {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"name": "full"}, {"name": "bitfit"}, {"name": "last_layers", "num_layers": 1},
    {"name": "delta_lora", "r": 4, "target_modules": ["q_proj"]},
    {"name": "qlora", "r": 4, "target_modules": "all-linear"}])
def test_trainable_tensors_are_fp32_on_a_bf16_base(ckpt, method):
    from peftlab.core.method import get_method
    from peftlab.train.config import _build

    method = dict(method)
    m = get_method(method.pop("name"))
    config = _build(m.config_cls, {**method, "task_type": "SEQ_CLS"}, "test")
    base = load_model(str(ckpt / "untied"), AutoModelForSequenceClassification, dtype="bf16", num_labels=2)
    model = get_peft_model(base, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable), \
        [(n, p.dtype) for n, p in trainable if p.dtype != torch.float32]
    assert any("score" in n for n, _ in trainable)  # the new head (modules_to_save or a trained base tensor)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    if m.name in ("lora", "last_layers", "qlora"):
        assert frozen == {torch.bfloat16}  # the base itself stays in bf16
    if m.name == "delta_lora":  # Delta-LoRA trains its layers' base weights too (on_step): fp32 master copies
        assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop's compute: runs, and gradients reach fp32 tensors
        model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    graded = [(n, p) for n, p in trainable if "lora_A" in n or "score" in n]
    assert graded and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in graded)


def test_train_run_base_dtype(ckpt, tmp_path):
    """`peftlab train`: model: {name, dtype} reaches the loader; the run's first line says it; trainables fp32."""
    from peftlab.train import Trainer, build_run_config

    rows = [{"text": s, "label": i % 2} for i, s in enumerate(sentences(16))]
    lines = []
    run = build_run_config({
        "model": {"name": str(ckpt / "untied"), "dtype": "bf16"}, "task": "classify",
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": write_jsonl(tmp_path / "d.jsonl", rows), "eval_fraction": 0.25, "max_length": 16},
        "train": {"output_dir": str(tmp_path / "out"), "batch_size": 4, "max_steps": 1, "precision": "bf16",
                  "progress": False, "tensorboard": False}})
    assert run.to_dict()["model"] == {"name": str(ckpt / "untied"), "dtype": "bf16"}
    out = io.StringIO()
    tiny_tokenizer().save_pretrained(ckpt / "untied")
    with contextlib.redirect_stderr(out):
        trainer = Trainer(run, log=lines.append)
    assert "peftlab: base in bf16 (asked" in out.getvalue().splitlines()[0]
    params = dict(trainer.peft_model.named_parameters())
    assert params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)


def test_text_classifier_loads_the_base_in_the_run_s_dtype(ckpt, tmp_path):
    """TextClassifier.from_run of a classify run with model.dtype bf16: the base comes back in bf16 (the run's dtype,
    not the fp32 default), runs under bf16 autocast beside the fp32 head and adapter, and its probabilities equal the
    same files on an fp32 base within bf16 rounding."""
    from peftlab.core.model import PeftModel
    from peftlab.train import TextClassifier, train

    from .conftest import run_config

    tiny_tokenizer().save_pretrained(ckpt / "untied")
    rows = [{"text": f"{w} {s}", "label": label} for s in sentences(12) for w, label in (("great", "good"),
                                                                                          ("awful", "bad"))]
    run = run_config(str(ckpt / "untied"), "classify", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "run",
                     max_steps=2, precision="bf16")
    run.model_dtype = "bf16"
    train(run, log=lambda *_: None)
    clf = TextClassifier.from_run(str(tmp_path / "run"))
    params = dict(clf.model.named_parameters())
    assert params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.bfloat16
    assert clf.autocast_dtype == torch.bfloat16
    texts = ["great fun", "awful mess", "great and awful"]
    base = AutoModelForSequenceClassification.from_pretrained(ckpt / "untied", num_labels=2)
    ref = TextClassifier(PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")), clf.tokenizer,
                         clf.labels, clf.data)
    torch.testing.assert_close(clf.predict_proba(texts), ref.predict_proba(texts), atol=0.03, rtol=0)


def test_saved_runs_reload_their_base_as_training_loaded_it(ckpt, tmp_path, monkeypatch):
    """TextClassifier.from_run of a qlora classify run and RewardModel.from_run of a bf16 reward run: the base comes
    back in the run's dtype, and the qlora one quantised as it is read (load_model gets `quantize`), not loaded in
    full precision and quantised only when the adapter wraps it."""
    from peftlab.methods.qlora import NF4Linear
    from peftlab.train import TextClassifier, model_loading, train
    from peftlab.train.preference import RewardModel

    from .conftest import run_config

    tiny_tokenizer().save_pretrained(ckpt / "untied")
    calls = []
    real_load_model = model_loading.load_model
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **kw: calls.append(kw) or real_load_model(*a, **kw))
    rows = [{"text": f"{w} {s}", "label": label} for s in sentences(12) for w, label in (("great", "good"),
                                                                                          ("awful", "bad"))]
    qlora = {"name": "qlora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    run = run_config(str(ckpt / "untied"), "classify", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "clf",
                     method=qlora, max_steps=2, precision="bf16")
    run.model_dtype = "bf16"
    train(run, log=lambda *_: None)
    calls.clear()
    clf = TextClassifier.from_run(str(tmp_path / "clf"))
    assert len(calls) == 1 and calls[0]["dtype"] == "bf16" and calls[0]["quantize"] is not None, calls
    assert clf.model.method_of("default").name == "qlora"  # the file reads as LoRA; the run says qlora
    assert isinstance(clf.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert torch.isfinite(clf.predict_proba(["great fun", "awful mess"])).all()

    pairs = [{"prompt": f"say {s}", "chosen": f"great {s}", "rejected": f"awful {s}"} for s in sentences(12)]
    run = run_config(str(ckpt / "untied"), "reward", write_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "rm",
                     max_steps=2, precision="bf16")
    run.model_dtype = "bf16"
    train(run, log=lambda *_: None)
    calls.clear()
    rm = RewardModel.from_run(str(tmp_path / "rm"))
    assert len(calls) == 1 and calls[0]["dtype"] == "bf16" and "quantize" not in calls[0], calls
    params = dict(rm.model.named_parameters())
    assert params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.bfloat16
    assert rm.autocast_dtype == torch.bfloat16
    assert torch.isfinite(rm.score(["say hi"], ["great hi"])).all()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_under_autocast_takes_x_as_is_same_numbers_less_saved(use_dora):
    """methods/lora/layer.py adapter_input (also DoRA's plain forward): on a bf16 base under bf16 autocast, A's matmul
    gets x itself instead of an fp32 copy that autocast casts back: output and every gradient equal the cast-up path
    bit for bit, and the adapters reading one x (here 3, as q, k, v do) save it once for backward instead of a bf16
    copy each."""
    from peftlab.methods.dora import layer as dora_layer
    from peftlab.methods.lora import layer as lora_layer

    module = dora_layer if use_dora else lora_layer
    torch.manual_seed(0)
    block = torch.nn.ModuleDict({n: torch.nn.Linear(64, 64) for n in ("q", "k", "v")}).to(torch.bfloat16)
    model = get_peft_model(torch.nn.Sequential(block), LoraConfig(r=4, target_modules=["q", "k", "v"],
                                                                  use_dora=use_dora))
    assert model.method_of("default").name == ("dora" if use_dora else "lora")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    x0 = torch.randn(8, 64, dtype=torch.bfloat16)

    def run():
        saved = []
        x = x0.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = sum(model.base_model.model[0][n](x).float().sum() for n in ("q", "k", "v"))
        model.zero_grad()
        out.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out, x.grad, grads, {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}

    new = run()
    real = module.adapter_input
    module.adapter_input = lambda x, dtype, dropout: x.to(dtype)  # the cast-up path it replaced
    try:
        old = run()
    finally:
        module.adapter_input = real
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert all(torch.equal(a, b) for a, b in zip(new[2], old[2]))
    # old: each adapter keeps its own bf16 copy of x (3); new: one x for all three (the frozen base keeps only W)
    assert sum(old[3].values()) - sum(new[3].values()) == 2 * x0.numel() * 2, (old[3], new[3])


def test_model_section_shorthand_and_checks():
    from peftlab.cli.options import DTYPE_CHOICES
    from peftlab.core.config import ConfigError
    from peftlab.models import DTYPE_CHOICES as MODEL_CHOICES
    from peftlab.train.config import load_run_config

    assert DTYPE_CHOICES == MODEL_CHOICES  # the CLI's torch-free copy
    run = load_run_config(None, ["train.precision=fp32"])
    assert (run.model, run.model_dtype, run.base_dtype) == ("smollm2", "auto", "fp32")  # fp32 compute: fp32 base
    run = load_run_config(None, ["model.dtype=bf16", "model.name=some/folder/x"])
    assert (run.model, run.model_dtype, run.base_dtype) == ("some/folder/x", "bf16", "bf16")
    with pytest.raises(ConfigError, match="model.dtype=bf16 with train.precision=fp32"):
        load_run_config(None, ["model.dtype=bf16", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="unknown key 'dtyp'. Did you mean dtype"):
        load_run_config(None, ["model.dtyp=bf16"])
    # auto for full fine-tuning is fp32 (every base weight becomes an fp32 master: a 16-bit load saves nothing and
    # starts from rounded weights; methods/full/config.py), said in the run's log; an explicit dtype is obeyed
    run = load_run_config(None, ["method=full", "train.precision=bf16"])
    assert (run.model_dtype, run.base_dtype) == ("auto", "fp32")
    assert "model.dtype auto -> fp32 for method full" in run.base_dtype_note
    run = load_run_config(None, ["method=full", "train.precision=bf16", "model.dtype=bf16"])
    assert (run.base_dtype, run.base_dtype_note) == ("bf16", None)
    run = load_run_config(None, ["train.precision=bf16"])  # LoRA: the hardware decides
    assert (run.base_dtype, run.base_dtype_note) == ("auto", None)


def test_pickled_checkpoint_is_refused_unread(tmp_path, monkeypatch):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was read"))
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model.bin \(a pickle\), not safetensors.*never "
                                                    r"unpickles.*save_pretrained"):
        load_model(str(tmp_path))


def test_qlora_quantised_at_load_equals_quantise_after_load(ckpt, tmp_path):
    """Same NF4 codes and scales as the old path (full load, then get_peft_model quantises), in fp32 and bf16; the
    adapter file loads in HF PEFT."""
    from peft import PeftModel as HFPeftModel

    from peftlab.core.method import get_method
    from peftlab.methods.qlora import NF4Linear, QLoraConfig

    config = QLoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")
    for dtype in ("fp32", "bf16"):
        at_load = load_model(str(ckpt / "untied"), dtype=dtype, quantize=get_method("qlora").quantize_at_load(config))
        quantised = {n for n, m in at_load.named_modules() if isinstance(m, NF4Linear)}
        assert len(quantised) == 14  # 7 linear layers x 2 blocks; lm_head stays
        assert all(p.dtype == DT[dtype] for n, p in at_load.named_parameters() if ".weight" not in n or
                   n.rpartition(".")[0] not in quantised)
        torch.manual_seed(0)
        new = get_peft_model(at_load, config)
        torch.manual_seed(0)
        old = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt / "untied", dtype=DT[dtype]), config)
        new_sd, old_sd = new.state_dict(), old.state_dict()
        assert new_sd.keys() == old_sd.keys()
        for key in old_sd:
            assert new_sd[key].dtype == old_sd[key].dtype and torch.equal(new_sd[key], old_sd[key]), key
        with torch.no_grad():
            assert torch.equal(new(IDS).logits, old(IDS).logits)
    new.save_pretrained(tmp_path / "adapter")
    hf = HFPeftModel.from_pretrained(new.unload(), tmp_path / "adapter")  # the dequantised base (bf16)
    hf_lora = {k: v for k, v in hf.state_dict().items() if "lora_" in k}
    ours = {k: v for k, v in new_sd.items() if "lora_" in k}
    assert len(hf_lora) == len(ours) == 28
    for key, value in hf_lora.items():
        assert torch.equal(value.float(), ours[key].float()), key


PEAK = textwrap.dedent("""
    import sys, torch
    from peftlab.models import load_model
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    load_model(sys.argv[1], dtype="fp32")  # warm up: imports, transformers' lazy modules, allocator pools
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS")
    model = load_model(sys.argv[1], dtype=sys.argv[2])
    print(rss("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
""")


def test_loader_never_holds_an_fp32_copy(tmp_path):
    """Peak RSS growth of loading an 86 MB fp32 checkpoint as bf16, in a fresh process: the bf16 model (43 MB) plus
    about one fp32 tensor (the largest, 16 MB), well under the 86 MB an fp32 copy alone would take."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    from safetensors.torch import save_file

    # random tensors written straight to a file (not through a model: that would need the memory we measure)
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in skeleton.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp_path)
    fp32_bytes = os.path.getsize(tmp_path / "model.safetensors")
    assert 80e6 < fp32_bytes < 90e6
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path), "bf16"], capture_output=True, text=True,
                         check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    growth, loaded = map(int, out.stdout.split()[-2:])
    largest = 8000 * 512 * 4
    assert loaded == fp32_bytes // 2 - (fp32_bytes // 2) % 2 or abs(loaded - fp32_bytes / 2) < 1e6
    assert growth < loaded + largest + 8e6, (growth, loaded)  # 8 MB: the allocator's slack
    assert growth < 0.8 * fp32_bytes


FREED = textwrap.dedent("""
    import sys, torch
    import peftlab.models.loading as loading
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    torch.ones(6 << 20)  # a 24 MB mapped block, freed at once: glibc raises its mmap threshold to 24 MB
    loading.load_model(sys.argv[1], dtype="fp32")
    before, held = rss(), []
    for i in range(16):  # a 4, 5, ..., 19 MB transient, then a 1 MB tensor kept (as activations are for backward)
        transient = torch.ones((4 + i) << 18)  # growing: no transient fits an earlier one's hole
        held.append(torch.ones(1 << 18))
        del transient
    print(rss() - before - sum(t.numel() * 4 for t in held))
""")


def test_after_load_freed_large_tensors_go_back_to_the_os_where_asked(ckpt):
    """With PEFTLAB_MMAP_THRESHOLD=1048576, load_model pins glibc's mmap threshold (loading.pin_mmap_threshold): 4-19
    MB tensors freed between kept ones leave no resident holes. Control: the default (unset: glibc's own dynamic
    threshold) keeps some (36 MB and more of the 184 MB freed)."""
    from peftlab.models.loading import _libc

    if _libc("mallopt") is None:
        pytest.skip("not glibc: no mmap threshold to pin")
    holes = {}
    for mode in ("control", "pinned"):
        env = {k: v for k, v in os.environ.items() if k != "PEFTLAB_MMAP_THRESHOLD"}  # control: the default
        if mode == "pinned":
            env["PEFTLAB_MMAP_THRESHOLD"] = "1048576"
        out = subprocess.run([sys.executable, "-c", FREED, str(ckpt / "single"), mode], capture_output=True, text=True,
                             check=True, env={**env, "TOKENIZERS_PARALLELISM": "false"})
        holes[mode] = int(out.stdout.split()[-1])
    assert holes["control"] > 20e6 and holes["pinned"] < 4e6, holes  # seen: 36-60 MB vs < 0.1 MB


def test_names_that_do_not_line_up_fall_back_to_transformers(ckpt, tmp_path, capsys):
    """A checkpoint missing a base tensor (another naming scheme, as older layouts have) is loaded by transformers'
    own from_pretrained in the target dtype, with a note; the tensors that are there arrive unchanged."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "untied" / "model.safetensors")
    gone = "model.layers.1.mlp.up_proj.weight"
    tensors = {k: v for k, v in tensors.items() if k != gone}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig.from_pretrained(ckpt / "untied").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bf16")
    assert "do not match LlamaForCausalLM's; loading it with transformers' from_pretrained" in capsys.readouterr().err
    state = model.state_dict()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    for key, value in tensors.items():
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
