"""peftlab as a drop-in for HF PEFT user code (issue 13).

Each test runs one of PEFT's documented user snippets twice, once on `peft` and once on `peftlab`, with only the
import changed (`lib.X` stands for `from lib import X`), and compares what the user sees: outputs, files, printed
text. Sizes are the tiny models of conftest.py and a few Trainer steps (use_cpu, report_to none), not the snippets'
hub models. Where PEFT's random initialisation would differ from ours, PEFT's adapter weights are copied into ours
with `set_peft_model_state_dict(get_peft_model_state_dict(...))`, which are themselves under test here.

Warnings are off (quiet_warnings): transformers' deprecation notes and PEFT's notes on tiny configs are expected.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import types

import peft as hf
import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                          TrainingArguments)
from transformers import Trainer as HFTrainer

import peftlab
from peftlab.integrations import Trainer as PeftlabTrainer
from peftlab.integrations import add_adapter_api

from .conftest import VOCAB, save_tiny, sentences, tiny_bert_cls, tiny_llama, tiny_t5, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("quiet_warnings")

LIBS = {"peft": hf, "peftlab": peftlab}
TRAINERS = {"peft": HFTrainer, "peftlab": PeftlabTrainer}
CLOSE = {"atol": 1e-5, "rtol": 1e-4}


def ids(seed: int = 1, n: int = 9) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def printed(fn, *args, **kwargs):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args, **kwargs)
    return result, buf.getvalue()


def perturb(model, seed: int = 7, names=("lora_B", "lora_magnitude_vector")) -> None:
    """Move PEFT's zero-initialised tensors so that an adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def align(ours, theirs, adapter_name: str = "default") -> None:
    """Give our adapter PEFT's weights; every one of them must fit one of ours."""
    result = peftlab.set_peft_model_state_dict(ours, hf.get_peft_model_state_dict(theirs, adapter_name=adapter_name),
                                               adapter_name=adapter_name)
    assert result.unexpected_keys == []


def logits(model, x) -> torch.Tensor:
    model.eval()  # a new PeftModel (PEFT's too) is in train mode: its LoRA dropout would be at work
    with torch.no_grad():
        return model(**x).logits


def adapter_files(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **CLOSE, msg=k)


# ---- quicktour ---------------------------------------------------------------------------------------------------


def quicktour(lib, model):
    LoraConfig, TaskType, get_peft_model = lib.LoraConfig, lib.TaskType, lib.get_peft_model  # the import
    peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                             lora_dropout=0.1)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    return model


def test_quicktour_prints_the_same_line_and_gives_the_same_model():
    theirs, text_theirs = printed(quicktour, hf, tiny_t5())
    ours, text_ours = printed(quicktour, peftlab, tiny_t5())
    assert text_ours == text_theirs and text_ours.startswith("trainable params: ")
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForSeq2SeqLM"
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    perturb(theirs)
    align(ours, theirs)
    ours.eval(), theirs.eval()
    x = {"input_ids": ids(), "decoder_input_ids": ids(2, 5)}
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), **CLOSE)
    # PeftModelForSeq2SeqLM's named forward parameters, as PEFT's (transformers' Trainer reads `labels` there)
    assert list(hf.PeftModelForSeq2SeqLM.forward.__code__.co_varnames[:13]) == list(
        __import__("inspect").signature(peftlab.PeftModelForSeq2SeqLM.forward).parameters)[:13]


# ---- transformers.Trainer: train, checkpoints, resume, best model, gradient checkpointing -------------------------


@pytest.fixture(scope="module")
def lm_data():
    from datasets import Dataset

    tok = tiny_tokenizer()
    # "text" stays in the dataset: Trainer's default remove_unused_columns=True must drop it by the model's signature
    data = Dataset.from_dict({"text": sentences(24)}).map(lambda b: tok(b["text"]), batched=True)
    return tok, data.select(range(16)), data.select(range(16, 24))


def lora_model(lib):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # the import
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(tiny_llama(), config)


def trainer_snippet(lib, model, tokenizer, train, test, out, max_steps: int = 4, stock: bool = False, **args):
    Trainer = HFTrainer if stock else TRAINERS[lib.__name__]  # the import
    training_args = TrainingArguments(
        output_dir=out, learning_rate=1e-2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=max_steps, weight_decay=0.01, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, load_best_model_at_end=True, use_cpu=True, report_to="none", **args)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return trainer


def pair_of_lora_models():
    theirs, ours = lora_model(hf), lora_model(peftlab)
    perturb(theirs)
    align(ours, theirs)
    return {"peft": theirs, "peftlab": ours}


def test_trainer_trains_saves_adapter_files_and_resumes_like_peft(lm_data, tmp_path):
    tok, train, test = lm_data
    runs = {}
    for name, model in pair_of_lora_models().items():
        out = str(tmp_path / name)
        trainer = trainer_snippet(LIBS[name], model, tok, train, test, out)
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        runs[name] = (out, trainer)
    (theirs_dir, theirs), (ours_dir, ours) = runs["peft"], runs["peftlab"]
    losses = [[e[k] for e in t.state.log_history for k in ("eval_loss", "train_loss") if k in e]
              for t in (ours, theirs)]
    assert len(losses[0]) == 3  # evaluations at steps 2 and 4, then the run's mean training loss
    torch.testing.assert_close(losses[0], losses[1], **CLOSE)
    for sub in ("checkpoint-2", "checkpoint-4", "final"):
        mine, ref = (set(os.listdir(os.path.join(d, sub))) for d in (ours_dir, theirs_dir))
        # The one difference: PEFT's save_pretrained also writes a model card (README.md); no model.safetensors
        assert mine == ref - {"README.md"}, sub
        assert_same_tensors(adapter_files(os.path.join(ours_dir, sub)), adapter_files(os.path.join(theirs_dir, sub)))
    assert hf.PeftConfig.from_pretrained(os.path.join(ours_dir, "final")).r == 8  # PEFT reads our checkpoint config
    # resume_from_checkpoint: a fresh model continues from checkpoint-2 and ends where the uninterrupted run did
    # (its best checkpoint, load_best_model_at_end), with the same checkpoint-4
    for name, model in pair_of_lora_models().items():
        out = runs[name][0]
        step4 = adapter_files(os.path.join(out, "checkpoint-4"))
        trainer = trainer_snippet(LIBS[name], model, tok, train, test, out)
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
        assert trainer.state.global_step == 4
        assert_same_tensors(adapter_files(os.path.join(out, "checkpoint-4")), step4)
        assert_same_tensors(LIBS[name].get_peft_model_state_dict(model), adapter_files(os.path.join(out, "final")))


def test_stock_trainer_trains_with_gradient_checkpointing_reaching_the_adapters(lm_data, tmp_path):
    """A stock transformers.Trainer trains a peftlab model (default column handling), and gradient checkpointing
    through it still reaches the adapters, as with PEFT."""
    tok, train, test = lm_data
    after = {}
    for name, model in pair_of_lora_models().items():
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer_snippet(LIBS[name], model, tok, train, test, str(tmp_path / name), max_steps=2, stock=True,
                        gradient_checkpointing=True).train()
        assert model.get_base_model().is_gradient_checkpointing
        after[name] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert all(not torch.equal(after[name][n], before[n]) for n in before if "lora_A" in n), name
    assert_same_tensors(after["peftlab"], after["peft"])


# ---- AutoPeftModelForCausalLM -----------------------------------------------------------------------------------


def auto_snippet(lib, adapter_dir, tokenizer_dir):
    AutoPeftModelForCausalLM = lib.AutoPeftModelForCausalLM  # the import
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    loaded_training = model.training
    model.eval()
    inputs = tokenizer("the movie was great and the acting", return_tensors="pt")
    outputs = model.generate(input_ids=inputs["input_ids"], max_new_tokens=8)
    print(tokenizer.batch_decode(outputs.detach().cpu().numpy(), skip_special_tokens=True)[0])
    return model, loaded_training


def test_auto_peft_model_for_causal_lm_loads_and_generates_like_peft(tmp_path):
    base_dir = save_tiny(tmp_path / "base", "llama")
    theirs = hf.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               hf.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM"))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    seen = {name: printed(auto_snippet, lib, str(tmp_path / "adapter"), base_dir) for name, lib in LIBS.items()}
    (ours, ours_training), text_ours = seen["peftlab"]
    (ref, ref_training), text_ref = seen["peft"]
    assert text_ours == text_ref and len(text_ours.split()) > 7
    assert type(ours).__name__ == type(ref).__name__ == "PeftModelForCausalLM"
    assert ours_training is ref_training is False  # from_pretrained without is_trainable: eval mode, as PEFT
    ours.save_pretrained(tmp_path / "ours")  # and the other way: PEFT's AutoPeftModel reads our folder
    (back, _), text_back = printed(auto_snippet, hf, str(tmp_path / "ours"), base_dir)
    assert text_back == text_ref


def test_from_pretrained_returns_eval_mode_unless_trainable(tmp_path):
    model = lora_model(peftlab)
    model.save_pretrained(tmp_path)
    for lib in (hf, peftlab):
        for trainable in (False, True):
            base = tiny_llama().train()
            loaded = lib.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=trainable)
            assert loaded.training is trainable and type(loaded).__name__ == "PeftModelForCausalLM", lib.__name__
            assert all(m.training is trainable for m in loaded.modules())


# ---- DoRA via use_dora -----------------------------------------------------------------------------------------


def test_use_dora_builds_dora_with_peft_outputs_and_files(tmp_path):
    models = {}
    for name, lib in LIBS.items():
        LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # the import
        config = LoraConfig(use_dora=True, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        models[name] = get_peft_model(tiny_llama(), config)
    ours, theirs = models["peftlab"], models["peft"]
    assert isinstance(ours.peft_config["default"], peftlab.DoraConfig)
    assert isinstance(ours.peft_config["default"], peftlab.LoraConfig)
    perturb(theirs)
    align(ours, theirs)
    x = {"input_ids": ids()}
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), **CLOSE)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    back = hf.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(back, x), logits(theirs, x), **CLOSE)


# ---- state-dict helpers, configs from folders ------------------------------------------------------------------


def test_state_dict_helpers_equal_peft(tmp_path):
    theirs = lora_model(hf)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    results = {}
    for name, lib in LIBS.items():
        get_peft_model_state_dict, set_peft_model_state_dict, load_peft_weights = (  # the import
            lib.get_peft_model_state_dict, lib.set_peft_model_state_dict, lib.load_peft_weights)
        model = lora_model(lib)
        adapters_weights = load_peft_weights(str(tmp_path))
        load_result = set_peft_model_state_dict(model, adapters_weights)
        results[name] = (adapters_weights, load_result, get_peft_model_state_dict(model), model)
    assert_same_tensors(results["peftlab"][0], results["peft"][0])
    assert results["peftlab"][1].unexpected_keys == results["peft"][1].unexpected_keys == []
    assert sorted(results["peftlab"][1].missing_keys) == sorted(results["peft"][1].missing_keys)
    assert_same_tensors(results["peftlab"][2], results["peft"][2])
    x = {"input_ids": ids()}
    torch.testing.assert_close(logits(results["peftlab"][3], x), logits(theirs, x), **CLOSE)
    # configs: PeftConfig / LoraConfig.from_pretrained, get_peft_config
    for lib in LIBS.values():
        config = lib.PeftConfig.from_pretrained(str(tmp_path))
        assert type(config).__name__ == "LoraConfig" and config.r == 8 and config.task_type == "CAUSAL_LM"
        assert lib.LoraConfig.from_pretrained(str(tmp_path)).lora_alpha == 16
        assert type(lib.get_peft_config(json.loads((tmp_path / "adapter_config.json").read_text()))).__name__ == \
            "LoraConfig"
    ia3 = hf.get_peft_model(tiny_llama(), hf.IA3Config(task_type="CAUSAL_LM"))
    ia3.save_pretrained(tmp_path / "ia3")
    for lib in LIBS.values():  # the folder's own class, whichever class is asked (PEFT's rule)
        assert type(lib.LoraConfig.from_pretrained(str(tmp_path / "ia3"))).__name__ == "IA3Config"


# ---- several adapters, driven through model.base_model (PEFT's tuner model) ---------------------------------


def add_other_adapter(lib, model):
    LoraConfig = lib.LoraConfig  # the import
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]))


def drive_through_base_model(model, x):
    outs = {}
    model.base_model.set_adapter("other")
    outs["other"] = logits(model, x)
    model.base_model.disable_adapter_layers()
    outs["disabled"] = logits(model, x)
    model.base_model.enable_adapter_layers()
    outs["enabled"] = logits(model, x)
    model.base_model.merge_adapter(adapter_names=["other"])
    outs["merged"] = logits(model, x)
    model.base_model.unmerge_adapter()
    model.base_model.set_adapter("default")
    outs["default"] = logits(model, x)
    return outs


def test_multi_adapter_through_base_model_matches_peft():
    models = {name: lora_model(lib) for name, lib in LIBS.items()}
    for name, lib in LIBS.items():
        add_other_adapter(lib, models[name])
    ours, theirs = models["peftlab"], models["peft"]
    perturb(theirs)  # both adapters' B (PEFT's random A and these are copied to ours next)
    for adapter in ("default", "other"):
        align(ours, theirs, adapter)
    ours.eval(), theirs.eval()
    x = {"input_ids": ids()}
    mine, ref = drive_through_base_model(ours, x), drive_through_base_model(theirs, x)
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], **CLOSE, msg=k)
    assert not torch.allclose(mine["other"], mine["default"]) and not torch.allclose(mine["disabled"], mine["other"])
    torch.testing.assert_close(mine["enabled"], mine["other"], **CLOSE)
    torch.testing.assert_close(mine["merged"], mine["other"], atol=1e-4, rtol=1e-4)


def test_method_specific_tuner_calls_route_through_the_method():
    lora = lora_model(peftlab)
    with pytest.raises(AttributeError, match=r"update_and_allocate is a call of adalora adapters.*'default' \(lora\)"):
        lora.base_model.update_and_allocate(1)
    x = {"input_ids": ids()}
    runs = []
    for by_hand in (True, False):  # PEFT's hand call vs the contract's on_step, which peftlab train calls
        torch.manual_seed(0)
        model = peftlab.get_peft_model(tiny_llama(), peftlab.AdaLoraConfig(init_r=4, target_r=2, total_step=4,
                                                                          target_modules=["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(1, 4):
            model(**x, labels=x["input_ids"]).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step) if by_hand else model.on_step(step)
            optimizer.zero_grad()
        runs.append(logits(model, x))
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


# ---- prompt learning: PEFT's parameter names -------------------------------------------------------------------


def test_prompt_learning_parameter_names_are_peft_names():
    names = {}
    for name, lib in LIBS.items():
        PromptTuningConfig, TaskType, get_peft_model = lib.PromptTuningConfig, lib.TaskType, lib.get_peft_model
        config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4,
                                    prompt_tuning_init=lib.PromptTuningInit.RANDOM)
        model = get_peft_model(tiny_bert_cls(), config)
        names[name] = [(n, p.requires_grad) for n, p in model.named_parameters()]
        assert isinstance(config, lib.PromptLearningConfig)
    assert names["peftlab"] == names["peft"]
    assert ("base_model.classifier.modules_to_save.default.weight", True) in names["peftlab"]


# ---- transformers' adapter calls on a plain model ---------------------------------------------------------------


def hf_adapter_snippet(lib, model, x, adapter_dir):
    LoraConfig = lib.LoraConfig  # the import
    lora_config = LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    model.add_adapter(lora_config, adapter_name="adapter_1")
    model.add_adapter(lora_config, adapter_name="adapter_2")
    model.load_adapter(adapter_dir, adapter_name="loaded")
    return model


def reference_adapter_api(model):
    """transformers' PeftAdapterMixin calls (transformers/integrations/peft.py) spelled with PEFT's own functions: the
    installed transformers asks PEFT >= 0.22 for them, newer than the reference PEFT here (0.21.2)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def layers(self):
        return [m for m in self.modules() if isinstance(m, BaseTunerLayer)]

    def add_adapter(self, adapter_config, adapter_name=None):
        hf.inject_adapter_in_model(adapter_config, self, adapter_name or "default")
        self.set_adapter(adapter_name or "default")

    def load_adapter(self, peft_model_id, adapter_name=None, is_trainable=False):
        config = hf.PeftConfig.from_pretrained(peft_model_id)
        config.inference_mode = not is_trainable
        hf.inject_adapter_in_model(config, self, adapter_name)
        hf.set_peft_model_state_dict(self, hf.load_peft_weights(peft_model_id), adapter_name=adapter_name)
        if config.inference_mode:
            self.eval()
            for m in layers(self):
                m.requires_grad_(False)

    def set_adapter(self, name):
        for m in layers(self):
            m.set_adapter(name)

    def switch(self, enabled):
        for m in layers(self):
            m.enable_adapters(enabled)

    calls = {"add_adapter": add_adapter, "load_adapter": load_adapter, "set_adapter": set_adapter,
             "disable_adapters": lambda self: switch(self, False), "enable_adapters": lambda self: switch(self, True),
             "active_adapters": lambda self: list(layers(self)[0].active_adapters),
             "get_adapter_state_dict": lambda self, name: hf.get_peft_model_state_dict(self, adapter_name=name)}
    for name, fn in calls.items():
        setattr(model, name, types.MethodType(fn, model))
    return model


def test_transformers_adapter_calls_on_a_plain_model_match_peft(tmp_path):
    saved = lora_model(hf)
    perturb(saved)
    saved.save_pretrained(tmp_path)
    x = {"input_ids": ids()}
    theirs = hf_adapter_snippet(hf, reference_adapter_api(tiny_llama()), x, str(tmp_path))
    ours = hf_adapter_snippet(peftlab, add_adapter_api(tiny_llama()), x, str(tmp_path))  # the one line of setup
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())  # same names: PEFT's random init copied over by name
    assert ours.active_adapters() == theirs.active_adapters() == ["loaded"]
    seen = {}
    for adapter in ("adapter_1", "adapter_2", "loaded"):
        for m in (ours, theirs):
            m.set_adapter(adapter)
        seen[adapter] = logits(ours, x)
        torch.testing.assert_close(seen[adapter], logits(theirs, x), **CLOSE, msg=adapter)
    for m in (ours, theirs):
        m.disable_adapters()
    torch.testing.assert_close(logits(ours, x), logits(tiny_llama(), x), **CLOSE)
    for m in (ours, theirs):
        m.enable_adapters()
    torch.testing.assert_close(logits(ours, x), seen["loaded"], **CLOSE)
    assert_same_tensors(ours.get_adapter_state_dict("loaded"), theirs.get_adapter_state_dict("loaded"))
    assert not ours.training  # loaded for inference: eval mode, as transformers does


def test_inject_adapter_in_model_and_status_match_peft():
    models = {}
    for name, lib in LIBS.items():
        LoraConfig, inject_adapter_in_model = lib.LoraConfig, lib.inject_adapter_in_model  # the import
        models[name] = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tiny_llama())
    ours, theirs = models["peftlab"], models["peft"]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    mine, ref = peftlab.get_model_status(ours), hf.get_model_status(theirs)
    for field in ("base_model_type", "trainable_params", "total_params", "num_adapter_layers", "enabled",
                  "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
        assert getattr(mine, field) == getattr(ref, field), field
    layers = [(s.name, s.enabled, s.active_adapters, s.requires_grad) for s in peftlab.get_layer_status(ours)]
    assert layers == [(s.name, s.enabled, s.active_adapters, s.requires_grad) for s in hf.get_layer_status(theirs)]


# ---- k-bit preparation on a base quantised to 4 bits on the CPU (bitsandbytes) ----------------------------------


def kbit_snippet(lib, model_dir):
    prepare_model_for_kbit_training, LoraConfig, get_peft_model = (  # the import
        lib.prepare_model_for_kbit_training, lib.LoraConfig, lib.get_peft_model)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model)
    prepared = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    config = LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model, prepared


def test_prepare_model_for_kbit_training_on_a_4bit_cpu_base_matches_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # widths of 64: bitsandbytes' CPU 4-bit kernels work in blocks of 64 inputs
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
                     ).save_pretrained(tmp_path)
    (theirs, prepared_theirs), text_theirs = printed(kbit_snippet, hf, str(tmp_path))
    (ours, prepared_ours), text_ours = printed(kbit_snippet, peftlab, str(tmp_path))
    assert prepared_ours == prepared_theirs
    assert {d for d, _ in prepared_ours.values()} == {torch.uint8, torch.float32}  # bf16 cast up, 4-bit codes kept
    assert text_ours == text_theirs  # 4-bit parameters counted as PEFT counts them
    assert ours.get_base_model().is_gradient_checkpointing and theirs.get_base_model().is_gradient_checkpointing
    perturb(theirs)
    align(ours, theirs)
    x = {"input_ids": ids()}
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), **CLOSE)
    grads = []
    for model in (ours, theirs):  # one training step's gradients reach every adapter through checkpointed layers
        model.train()
        torch.manual_seed(0)  # the same LoRA dropout masks
        model(**x, labels=x["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-3, msg=n)
    with pytest.raises(ValueError, match="holds its weight quantised .* nothing was merged"):
        ours.merge_adapter()
    PeftlabTrainer(model=ours, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True,
                                                     report_to="none"))  # Trainer takes it: adapters are attached


# ---- files and refusals ---------------------------------------------------------------------------------------


def test_safe_serialization_false_is_refused_in_one_line(tmp_path):
    model = lora_model(peftlab)
    with pytest.raises(ValueError) as err:
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert "\n" not in str(err.value) and "pickle" in str(err.value) and "safetensors" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_peft_names_exist_and_peft_types_cover_every_method():
    for name in ("PeftModelForCausalLM", "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM",
                 "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
                 "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification",
                 "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForTokenClassification",
                 "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
                 "get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights",
                 "inject_adapter_in_model", "get_peft_config", "prepare_model_for_kbit_training", "get_layer_status",
                 "get_model_status", "PeftType", "PromptTuningInit", "PromptLearningConfig", "PeftConfig"):
        assert hasattr(peftlab, name) and hasattr(hf, name), name
        assert name in peftlab.__all__, name
    assert {m.config_cls.peft_type for m in peftlab.registered_methods()} <= {t.value for t in peftlab.PeftType}
    shared = {t.value for t in peftlab.PeftType} & {t.value for t in hf.PeftType}
    assert shared == {"LORA", "ADALORA", "VERA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "LOHA", "LOKR",
                      "OFT", "LN_TUNING", "ADAPTION_PROMPT"}
    assert [t.value for t in peftlab.PromptTuningInit] == [t.value for t in hf.PromptTuningInit]


def test_every_registered_methods_config_is_exported_from_the_top_level():
    # `from peftlab import LoHaConfig` as PEFT users write it: a new method folder must add its config to peftlab's
    # lazy exports (and __all__), or this names the one it forgot.
    for method in peftlab.registered_methods():
        name = method.config_cls.__name__
        assert getattr(peftlab, name, None) is method.config_cls and name in peftlab.__all__, (method.name, name)


# ---- `peftlab train`: PEFT's parameter line at the start, figures in the model card ------------------------------


def test_peftlab_train_prints_the_trainable_line_and_records_it(llama_dir, tmp_path):
    from peftlab.train import train

    from .conftest import run_config

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in sentences(12)])
    lines = []
    train(run_config(llama_dir, "causal_lm", data, tmp_path / "out", max_steps=2), log=lines.append)
    reference = hf.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                                  hf.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _, expected = printed(reference.print_trainable_parameters)
    assert expected.strip() in [str(line).strip() for line in lines]
    assert expected.strip() in (tmp_path / "out" / "adapter" / "README.md").read_text()
