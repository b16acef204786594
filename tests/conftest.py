"""Tiny models built from configs (nothing downloaded): the fixtures every test shares."""

from __future__ import annotations

import copy
import functools
import os
import warnings

# Triton kernels (peftlab/kernels) are tested on CPU under Triton's interpreter. Triton reads TRITON_INTERPRET when it
# is first imported, and transformers imports it below, so it must be set here, before anything else.
if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: interpret (on a GPU machine the kernels compile)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)  # livelier than 0.02: adapters visibly move the logits
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls, "t5": tiny_t5}


@functools.lru_cache(maxsize=None)
def _built_once(kind: str, seed: int) -> torch.nn.Module:
    return BUILDERS[kind](seed)


def fresh_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A deep copy of `BUILDERS[kind](seed)`, which is built once per session: the same weights as a new build, for
    about half the time (transformers' constructor and weight init are the cost). Unlike a build it leaves torch's
    global seed alone: seed before anything random that must repeat."""
    return copy.deepcopy(_built_once(kind, seed))


def model_inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (2, 5), generator=g)}
    return {"input_ids": ids}


def output_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


WORDS = ("the a movie film was is great good bad awful fun boring loved hated it i and but not very plot acting "
         "story ending music actors scenes hello hi how are you doing well thanks what your name my question "
         "yes no please help positive negative review write about this that so really quite").split()
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer over WORDS (ids < VOCAB), built offline, with a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "user", "assistant", "system", ":"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(WORDS)))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny(folder, kind: str = "llama", seed: int = 0) -> str:
    """Save a tiny model (+ tokenizer) as an HF folder, as `peftlab train` loads it from `model:`."""
    model = BUILDERS[kind](seed) if kind != "bert" else tiny_bert_cls(seed)
    model.config.pad_token_id = 0
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def sentences(n: int, seed: int = 0) -> list[str]:
    """n short random sentences over WORDS (4-9 words), reproducible by seed."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def run_config(model_dir, task, train_file, out, method=None, **train_opts):
    """A `peftlab train` run config for a tiny model: 12 steps of batch 4, fp32, no progress bar."""
    from peftlab.train import build_run_config

    return build_run_config({
        "model": model_dir, "task": task,
        "method": method or {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": train_file, "eval_fraction": 0.25, "max_length": 32},
        "train": {"output_dir": str(out), "lr": 1e-2, "batch_size": 4, "max_steps": 12, "log_every": 1,
                  "progress": False, "tensorboard": False, "precision": "fp32", **train_opts},
    })


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module's tests, restored after (a file opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; OMP_NUM_THREADS, when set, wins). Every model here is tiny,
    and with torch's default (one thread per core) OpenMP threads spin waiting for a core that other jobs hold:
    benchmarks/tiny_forward_threads.py on a busy 2-core machine (load 6.8) gave a tiny BERT forward 88.8 ms with 2
    threads vs 2.9 ms with 1, Llama 13.0 vs 1.8 ms; tests/test_conformance.py took 57.7 min with 2 threads at load ~15
    and 61 s with 1 at load ~6.5. Not made global: one thread splits GEMMs differently, and a test whose PEFT-parity
    tolerance was measured with 2 threads can move past it (test_method_adalora's pruned-file test: 1.4e-6 vs 1e-6)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def quiet_warnings():
    """Warnings off for one test: for test files that compare against HF PEFT and transformers, whose expected
    notes (Conv1D fan_in_fan_out, deprecations, ...) would bury the report. A file opts in with
    `pytestmark = pytest.mark.usefixtures("quiet_warnings")` and says which warnings it expects beside it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as an HF folder (what `model:` points at in run configs)."""
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


class TinyConv(torch.nn.Module):
    """A non-transformers model with an nn.Conv2d (kernel 3, padding 1, bias) and a linear head; it has no
    config, so target_modules must be explicit."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def straight_and_resumed(make_run, tmp_path, monkeypatch, crash_at: int = 7):
    """Train `make_run(output_dir)` to the end once, and once more with a simulated crash before step
    `crash_at` followed by `--resume` from the newest checkpoint. Returns (straight, resumed) output folders
    and the checkpoint names present at the crash; the two runs' adapter files must be equal."""
    import os

    from peftlab.train import Trainer, train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_run(straight), log=lambda *_: None)
    original_step = Trainer._step

    def crash(self):
        if self.state.step == crash_at:
            raise KeyboardInterrupt("simulated crash")
        return original_step(self)

    monkeypatch.setattr(Trainer, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(make_run(resumed), log=lambda *_: None)
    monkeypatch.setattr(Trainer, "_step", original_step)
    at_crash = sorted(os.listdir(resumed / "checkpoints"))
    train(make_run(resumed), resume=True, log=lambda *_: None)
    return straight, resumed, at_crash
