"""`peftlab merge`: the QLoRA-faithful merge and the merge check.

- An adapter trained with method qlora (a plain LoRA file beside the run's run_config.yaml) is merged into the
  dequantised NF4 weights it was trained against: the merged weights equal dequantize(quantize(W)) + s B A computed
  here from nf4.py and the file's A and B, and the merged model matches the QLoRA adapter model far better than the
  same adapter merged into the original weights (both measured).
- Every mergeable method's merge prints the largest |logit difference| between the adapter model and the merged
  model, and it is float rounding; a deliberately broken merge makes the warning fire with its figure.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftlab import PeftModel, get_peft_model, registered_methods
from peftlab.cli.main import main
from peftlab.core.model import read_config
from peftlab.methods.lora.layer import LoraLinear
from peftlab.methods.qlora import QLoraConfig, dequantize_nf4, quantize_nf4
from peftlab.models import load_model

from .conftest import BUILDERS, save_tiny, sentences, write_jsonl
from .conftest import run_config as make_run_config
from .test_conformance import _examples, _perturb

CHECK = re.compile(r"merge check: largest \|logit difference\| between the adapter model and the merged model on "
                   r"(\d+) rows \((\d+) tokens\): (\S+) \((\S+) of the largest \|logit\|\)")


def _merge(capsys, *args) -> tuple[int, str, str, float, float]:
    """Run `peftlab merge ARGS`; (exit code, stdout, stderr, figure, relative figure)."""
    code = main(["merge", *args])
    out, err = capsys.readouterr()
    found = CHECK.search(out)
    assert found, out + err
    return code, out, err, float(found.group(3)), float(found.group(4))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, llama_dir):
    """A short `peftlab train` run with method qlora (fp32 base, blocksize 32, no double quantisation: settings
    other than the defaults, which the merge can only know from the run's run_config.yaml)."""
    from peftlab.train import train

    tmp = tmp_path_factory.mktemp("qlora_run")
    data = write_jsonl(tmp / "train.jsonl", [{"text": s} for s in sentences(40)])
    method = {"name": "qlora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "bnb_4bit_blocksize": 32, "bnb_4bit_use_double_quant": False}
    train(make_run_config(llama_dir, "causal_lm", data, tmp / "run", method=method, max_steps=4),
          log=lambda *_: None)
    return tmp / "run"


def test_qlora_merge_folds_the_update_into_the_dequantised_nf4_weights(qlora_run, llama_dir, tmp_path, capsys):
    adapter = qlora_run / "adapter"
    file_config = read_config(str(adapter))
    assert type(file_config).__name__ == "LoraConfig"  # the file alone cannot say it was QLoRA
    ids = torch.tensor([[5, 17, 3, 44, 60, 2, 9, 31, 70, 12]])

    # The model as trained: QLoRA (quantised with the run's settings) + the adapter.
    trained = PeftModel.from_pretrained(load_model(llama_dir), str(adapter), config=QLoraConfig.from_lora(
        file_config, bnb_4bit_blocksize=32, bnb_4bit_use_double_quant=False))
    reference = _logits(trained, ids)

    code, out, _, figure, relative = _merge(capsys, llama_dir, str(adapter), str(tmp_path / "faithful"))
    assert code == 0 and "trained with method qlora" in out and "run_config.yaml" in out
    faithful = AutoModelForCausalLM.from_pretrained(tmp_path / "faithful")
    # Merged weight == dequantize(quantize(W)) + s B A, from nf4.py and the file's tensors (fp32 throughout).
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    base = load_model(llama_dir)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = base.get_submodule(path).weight.detach()
        w_hat = dequantize_nf4(*quantize_nf4(w, 32, False), torch.float32)
        a, b = weights[f"base_model.model.{path}.lora_A.weight"], weights[f"base_model.model.{path}.lora_B.weight"]
        expected = w_hat + (8 / 4) * b @ a
        torch.testing.assert_close(faithful.get_submodule(path).weight, expected, rtol=0, atol=2e-6)
        assert (w_hat - w).abs().max() > 1e-2  # the two bases differ visibly (tiny model: init range 0.2)

    # The same adapter merged into the original weights: without the run folder the file reads as plain LoRA.
    bare = tmp_path / "bare_adapter"
    shutil.copytree(adapter, bare)
    code, out_bare, _, _, _ = _merge(capsys, llama_dir, str(bare), str(tmp_path / "original"))
    assert code == 0 and "trained with method" not in out_bare
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original")

    faithful_diff = float((_logits(faithful, ids) - reference).abs().max())
    original_diff = float((_logits(original, ids) - reference).abs().max())
    scale = float(reference.abs().max())
    assert faithful_diff / scale < 1e-5, faithful_diff
    assert original_diff > 1000 * faithful_diff and original_diff / scale > 1e-3, (original_diff, faithful_diff)
    # The check's own figure is the adapter model vs the merged model of the same run: rounding only.
    assert relative < 1e-5 and figure < 1e-4

    # --method qlora on the bare folder: QLoRA's defaults (blocksize 64, double quantisation), not this run's, so the
    # weights are those of another quantisation; with the run's settings passed through the run folder they match.
    code, out_m, _, _, _ = _merge(capsys, llama_dir, str(bare), str(tmp_path / "by_flag"), "--method", "qlora")
    assert code == 0 and "(--method qlora)" in out_m
    by_flag = AutoModelForCausalLM.from_pretrained(tmp_path / "by_flag")
    w = base.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
    w_hat64 = dequantize_nf4(*quantize_nf4(w, 64, True), torch.float32)
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(by_flag.get_submodule("model.layers.0.self_attn.q_proj").weight, w_hat64 + 2 * b @ a,
                               rtol=0, atol=2e-6)


def test_generate_loads_a_qlora_adapter_onto_its_4bit_base(qlora_run, llama_dir):
    """`peftlab generate` (load_for_generation) on the run's adapter: the model computes what the trained model
    computes (QLoRA with the run's settings), not the plain-LoRA reading of the file on the original weights."""
    from peftlab.cli.generate_cmd import load_for_generation

    adapter = qlora_run / "adapter"
    ids = torch.tensor([[5, 17, 3, 44, 60, 2, 9, 31, 70, 12]])
    trained = PeftModel.from_pretrained(load_model(llama_dir), str(adapter), config=QLoraConfig.from_lora(
        read_config(str(adapter)), bnb_4bit_blocksize=32, bnb_4bit_use_double_quant=False))
    _, net = load_for_generation(llama_dir, str(adapter), "fp32")
    assert net.method_of("default").name == "qlora"
    torch.testing.assert_close(_logits(net, ids), _logits(trained, ids), rtol=0, atol=1e-5)


def test_generate_quantises_a_bf16_run_s_base_from_bf16_weights_whatever_dtype_it_computes_in(llama_dir, tmp_path):
    """A qlora run with its base in bf16, generated from in fp32: the 4-bit codes are made from the bf16 weights, as
    the run made them (Trained.base_load, shared with merge), not from the fp32 ones; the model then computes in
    fp32."""
    from peftlab.cli.generate_cmd import load_for_generation
    from peftlab.core.method import get_method
    from peftlab.train import train

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in sentences(16)])
    method = {"name": "qlora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    run = make_run_config(llama_dir, "causal_lm", data, tmp_path / "run", method=method, max_steps=1,
                          precision="bf16")
    run.model_dtype = "bf16"
    train(run, log=lambda *_: None)
    _, net = load_for_generation(llama_dir, str(tmp_path / "run" / "adapter"), "fp32")
    quantize = get_method("qlora").quantize_at_load(QLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    as_trained = load_model(llama_dir, dtype="bf16", quantize=quantize)
    from_fp32 = load_model(llama_dir, dtype="fp32", quantize=quantize)
    path = "model.layers.0.self_attn.q_proj"
    ours = net.get_base_model().get_submodule(path).base_layer
    assert torch.equal(ours.weight, as_trained.get_submodule(path).weight)
    assert not torch.equal(ours.weight, from_fp32.get_submodule(path).weight)  # the two quantisations differ here
    assert ours.dequantized_weight().dtype == torch.float32  # computing in the dtype asked for


def test_serve_warns_that_a_qlora_adapter_runs_on_the_full_precision_base(qlora_run, llama_dir, tmp_path):
    """peftlab serve shares one full-precision base: a qlora adapter (its run_config.yaml beside it says so) is served
    with a warning that says so and what to do; the same file without its run (plain LoRA for all anyone knows) is
    not."""
    import warnings

    from peftlab.serve.mixed import read_adapter

    base = load_model(llama_dir)
    with pytest.warns(UserWarning, match=r"trained with method qlora .* on a quantised base.*peftlab merge"):
        assert read_adapter(base, str(qlora_run / "adapter"))[0] == "lora"
    bare = tmp_path / "bare"
    shutil.copytree(qlora_run / "adapter", bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_adapter(base, str(bare))


def test_method_flag_that_does_not_fit_the_file_is_one_error_line(qlora_run, llama_dir, tmp_path, capsys):
    code = main(["merge", llama_dir, str(qlora_run / "adapter"), str(tmp_path / "x"), "--method", "ia3"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "IA3Config" in err and "LoraConfig" in err, err
    assert not (tmp_path / "x").exists()


def _mergeable_cases():
    """One conformance-table row per registered method that merges (and is trained by the loop): its llama row, or
    its gpt2 row for a method with no llama row (BitFit: llama has no biases)."""
    merging = [m for m in registered_methods() if m.merges and m.run is None]
    rows: dict[str, tuple] = {}
    for arch in ("llama", "gpt2"):
        for method in merging:
            example = next((e for e in _examples(method) if e.arch == arch), None)
            if example is not None and method.name not in rows:
                rows[method.name] = (method.name, arch, example.make_config)
    assert set(rows) == {m.name for m in merging}, sorted({m.name for m in merging} - set(rows))
    return [pytest.param(*row, id=name) for name, row in sorted(rows.items())]


@pytest.mark.parametrize("name,arch,make_config", _mergeable_cases())
def test_every_mergeable_method_prints_a_small_merge_check_figure(name, arch, make_config, tmp_path, capsys):
    model_dir = save_tiny(tmp_path / arch, arch)
    model = get_peft_model(BUILDERS[arch](), make_config())
    _perturb(model)  # random adapter values: the merge changes the weights
    model.save_pretrained(tmp_path / "adapter")
    code, out, err, figure, relative = _merge(capsys, model_dir, str(tmp_path / "adapter"), str(tmp_path / "m"))
    assert code == 0 and "warning" not in err, err
    assert int(CHECK.search(out).group(1)) == 4
    assert relative < 1e-5, (name, figure, relative)


def test_the_warning_fires_with_the_figure_on_a_broken_merge(qlora_run, llama_dir, tmp_path, capsys, monkeypatch):
    adapter = tmp_path / "adapter"
    shutil.copytree(qlora_run / "adapter", adapter)  # read as plain LoRA
    real = LoraLinear.delta_weight
    monkeypatch.setattr(LoraLinear, "delta_weight", lambda self, name: 50 * real(self, name))  # merge 50x the update
    code, out, err, figure, relative = _merge(capsys, llama_dir, str(adapter), str(tmp_path / "broken"))
    assert code == 0 and relative > 1e-2
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1, err
    assert f"by up to {figure:.3g}" in warning[0]
    assert f"({relative:.2g} of the largest |logit|, above 16 x fp32's epsilon 1.2e-07 = 1.9e-06, the" in warning[0]
    # The figure is the real difference: the saved model vs the adapter model, measured here again.
    ids = torch.tensor([[5, 17, 3, 44, 60, 2, 9, 31, 70, 12]])
    monkeypatch.setattr(LoraLinear, "delta_weight", real)
    adapter_model = PeftModel.from_pretrained(load_model(llama_dir), str(adapter))
    broken = AutoModelForCausalLM.from_pretrained(tmp_path / "broken")
    assert float((_logits(broken, ids) - _logits(adapter_model, ids)).abs().max()) > 0.1 * figure


def test_the_tolerance_scales_with_the_dtype_s_epsilon(tmp_path, capsys, monkeypatch):
    """A correct bf16 merge rounds every merged weight to 8 mantissa bits: its figure is far above fp32's tolerance
    but within bf16's (16 x 2^-7), so no warning; a merge of 50x the update is far outside it and warns, naming the
    tolerance. Reference: the same merge in fp32 differs by fp32 rounding only."""
    from peftlab import LoraConfig
    from peftlab.cli.merge_cmd import tolerance

    model_dir = save_tiny(tmp_path / "llama", "llama")
    model = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    figures = {}
    for dtype in ("fp32", "bf16"):
        code, _, err, _, figures[dtype] = _merge(capsys, model_dir, str(tmp_path / "adapter"), str(tmp_path / dtype),
                                                 "--dtype", dtype)
        assert code == 0 and "warning" not in err, (dtype, err)
    assert tolerance("fp32")[0] == 16 * torch.finfo(torch.float32).eps and tolerance("bf16")[0] == 16 / 128
    assert figures["fp32"] < tolerance("fp32")[0] < figures["bf16"] < tolerance("bf16")[0], figures
    real = LoraLinear.delta_weight
    monkeypatch.setattr(LoraLinear, "delta_weight", lambda self, name: 50 * real(self, name))
    code, _, err, _, relative = _merge(capsys, model_dir, str(tmp_path / "adapter"), str(tmp_path / "broken"),
                                       "--dtype", "bf16")
    assert code == 0 and relative > 0.125
    assert "above 16 x bf16's epsilon 0.0078 = 0.12, the rounding a correct merge in this dtype" in err, err
