"""Data in the shapes people already keep it: datasets' save_to_disk folders (Dataset and DatasetDict), hub ids
(offline: one line saying how to pass a local copy), ShareGPT conversations with their role names and a `roles:`
mapping, and the bad inputs of each (one line, or skipped and counted with skip_bad_rows).

Masking is checked by decoding the labelled tokens: every assistant turn (and its end-of-turn token) is trained,
nothing else. Everything is made here; nothing is downloaded (the hub test runs with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab.core.config import ConfigError
from peftlab.data import DataConfig, DataError, encode_rows, load_splits

from .test_data import EOS, ids, make_tokenizer, trained, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)  # "<bos><role> text <eos> ..." over a word-level vocabulary


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [{"text": t} for t in ("the cat sat", "a dog ran", "hello how are you", "the sky is blue")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    splits = load_splits(DataConfig(train_file=str(tmp_path / "one"), eval_fraction=0), "causal_lm")
    assert [r["text"] for r in splits.train] == [r["text"] for r in rows]
    assert [r["_row"] for r in splits.train] == [1, 2, 3, 4] and splits.train[0]["_file"] == str(tmp_path / "one")

    folder = str(tmp_path / "dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(folder)
    splits = load_splits(DataConfig(train_file=folder, eval_split="test"), "causal_lm")  # no carving: the test split
    assert [r["text"] for r in splits.train] == [r["text"] for r in rows[:3]]
    assert [r["text"] for r in splits.eval] == ["the sky is blue"]
    assert splits.eval[0]["_file"] == f"{folder}[test]" and splits.report["eval_from"] == "split test of train_file"
    # split picks which part trains; a DatasetDict folder can also be the eval_file
    swapped = load_splits(DataConfig(train_file=folder, split="test", eval_file=folder, eval_split="train"),
                          "causal_lm")
    assert [r["text"] for r in swapped.train] == ["the sky is blue"] and len(swapped.eval) == 3
    # a dataset folder mixes with plain files in one list
    extra = write_jsonl(tmp_path / "more.jsonl", [{"text": "see you later"}])
    mixed = load_splits(DataConfig(train_file=[folder, extra], eval_fraction=0), "causal_lm")
    assert [r["_file"] for r in mixed.train] == [f"{folder}[train]"] * 3 + [extra]


def test_dataset_folder_bad_input(tmp_path):
    import datasets

    folder = str(tmp_path / "dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a b"}] * 3),
                          "validation": datasets.Dataset.from_list([{"text": "c d"}])}).save_to_disk(folder)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_file=folder, eval_split="test"), "causal_lm")
    msg = str(err.value)
    assert f"{folder} is a DatasetDict with the splits 'train', 'validation', and no split 'test'" in msg
    assert "`eval_split: train`" in msg and "\n" not in msg
    with pytest.raises(DataError, match="no split 'dev'.*Fix: `split: train`"):
        load_splits(DataConfig(train_file=folder, split="dev"), "causal_lm")

    one = str(tmp_path / "one")
    datasets.Dataset.from_list([{"text": "a b"}] * 4).save_to_disk(one)
    with pytest.raises(DataError, match=r"holds one Dataset \(save_to_disk of a Dataset, no splits\).*drop `split`"):
        load_splits(DataConfig(train_file=one, split="train"), "causal_lm")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataError, match="is a folder, but not one written by datasets' save_to_disk"):
        load_splits(DataConfig(train_file=str(plain)), "causal_lm")
    file = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}] * 4)
    with pytest.raises(DataError, match="eval_split='test' reads a split of train_file's datasets, but .*t.jsonl is a "
                                        "file"):
        load_splits(DataConfig(train_file=file, eval_split="test"), "causal_lm")

    # a bad row in a dataset is named by folder[split] and row, and skip_bad_rows counts it
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a b"}, {"text": " "}, {"text": "c"}])}
                         ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[train\], row 2, column 'text': is empty"):
        load_splits(DataConfig(train_file=str(tmp_path / "bad")), "causal_lm")
    splits = load_splits(DataConfig(train_file=str(tmp_path / "bad"), skip_bad_rows=True, eval_fraction=0),
                         "causal_lm")
    assert len(splits.train) == 2
    assert splits.report["skipped"] == {"train: text: empty": {"count": 1, "examples": [f"{tmp_path}/bad[train]:2"]}}


def test_hub_id_offline_says_how_to_pass_a_local_copy(tmp_path):
    # A fresh process with the hub switched off (datasets reads the switch at import) and an empty cache: the read
    # fails before any request, and the one line says what to do.
    code = ("from peftlab.data import DataConfig, DataError, load_splits\n"
            "try:\n"
            "    load_splits(DataConfig(train_file='someorg/chat-data', config='en', revision='v1'), 'sft')\n"
            "except DataError as err:\n"
            "    print(err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    msg = out.stdout.strip()
    assert msg.count("\n") == 0 and msg.startswith("train_file: 'someorg/chat-data' is not a file or folder here"), \
        out.stdout + out.stderr
    assert "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" in msg
    assert "datasets.load_dataset('someorg/chat-data', 'en', revision='v1').save_to_disk('DIR')" in msg
    assert "`train_file: DIR`" in msg
    # a name with a file suffix is never taken for a hub id
    with pytest.raises(DataError, match="file not found: nope.jsonl"):
        load_splits(DataConfig(train_file="nope.jsonl"), "sft")


CONVERSATION = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"},
                {"from": "gpt", "value": "hi how are you"}, {"from": "observation", "value": "sky is blue"},
                {"from": "human", "value": "fine thanks"}, {"from": "gpt", "value": "good bye"}]


def test_sharegpt_rows_train_every_assistant_turn(tmp_path, tok):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": CONVERSATION, "id": "x1"}])
    cfg = DataConfig(train_file=path, eval_fraction=0)
    splits = load_splits(cfg, "sft")
    assert splits.train[0]["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi how are you"}, {"role": "tool", "content": "sky is blue"},
        {"role": "user", "content": "fine thanks"}, {"role": "assistant", "content": "good bye"}]
    assert splits.report["row_shapes"] == {"chat (ShareGPT)": 1}
    (ex,) = encode_rows(splits.train, "sft", tok, cfg)
    assert ex["input_ids"] == ids(tok, tok.apply_chat_template(splits.train[0]["messages"], tokenize=False))
    # exactly the two assistant turns and their end-of-turn token; nothing of system, user or tool turns
    assert tok.decode(trained(ex)) == "hi how are you <eos> good bye <eos>"
    assert trained(ex) == ids(tok, "hi how are you") + [EOS] + ids(tok, "good bye") + [EOS]


def test_sharegpt_from_a_dataset_folder_with_mapped_column(tmp_path, tok):
    import datasets

    rows = [{"dialog": [{"from": "Human", "value": "what is two plus three"}, {"from": "GPT", "value": "five"}]},
            {"dialog": [{"from": "user", "value": "say yes"}, {"from": "chatgpt", "value": "yes"},
                        {"from": "human", "value": "say no"}, {"from": "model", "value": "no"}]}]
    folder = str(tmp_path / "chats")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(folder)
    cfg = DataConfig(train_file=folder, eval_fraction=0, columns={"conversations": "dialog"})
    examples = encode_rows(load_splits(cfg, "sft").train, "sft", tok, cfg)
    assert [tok.decode(trained(e)) for e in examples] == ["five <eos>", "yes <eos> no <eos>"]


def test_roles_mapping_and_unknown_role(tmp_path, tok):
    rows = [{"conversations": [{"from": "narrator", "value": "be brief"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}]
    path = write_jsonl(tmp_path / "r.jsonl", rows * 3)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_file=path), "sft")
    msg = str(err.value)
    assert "row 1, column 'conversations': message 0 has from 'narrator'; known: assistant, bard," in msg
    assert "`roles: {narrator: user}`" in msg and "\n" not in msg
    cfg = DataConfig(train_file=path, eval_fraction=0, roles={"narrator": "system"})
    splits = load_splits(cfg, "sft")
    assert [m["role"] for m in splits.train[0]["messages"]] == ["system", "user", "assistant"]
    # `roles:` maps OpenAI-style `messages` roles too (they are otherwise ours exactly)
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "human", "content": "hi"},
                                                             {"role": "bot", "content": "hello"}]}])
    splits = load_splits(DataConfig(train_file=chat, eval_fraction=0, roles={"human": "user", "bot": "assistant"}),
                         "sft")
    assert [m["role"] for m in splits.train[0]["messages"]] == ["user", "assistant"]
    with pytest.raises(ConfigError, match=r"roles=\{'bot': 'robot'\} is not valid; .*system, user, assistant, tool"):
        DataConfig(train_file=chat, roles={"bot": "robot"})


SHAREGPT_BAD = [
    ([{"from": "human", "value": "hi"}, {"from": "alien", "value": "yo"}], "from 'alien'",
     "conversations: unknown role"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"}],
     "ends on a user turn (message 2), which nothing answers", "conversations: ends on a user turn"),
    ([{"from": "human", "value": "hi"}], "has no assistant turn", "conversations: no assistant turn"),
    ([{"from": "human", "text": "hi"}, {"from": "gpt", "value": "yo"}], "message 0 needs keys 'from' and 'value'",
     "conversations: malformed message"),
]


@pytest.mark.parametrize("conv,what,reason", SHAREGPT_BAD, ids=[r[2] for r in SHAREGPT_BAD])
def test_sharegpt_bad_rows_raise_or_are_counted(tmp_path, conv, what, reason):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, good, {"conversations": conv}, good])
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_file=path), "sft")
    msg = str(err.value)
    assert f"{path}, row 3, column 'conversations': " in msg and what in msg and "skip_bad_rows: true" in msg, msg
    assert "\n" not in msg
    splits = load_splits(DataConfig(train_file=path, skip_bad_rows=True, eval_fraction=0), "sft")
    assert len(splits.train) == 3 and splits.report["counts"]["skipped"] == 1
    assert splits.report["skipped"] == {f"train: {reason}": {"count": 1, "examples": [f"{path}:3"]}}


def test_data_config_new_fields_round_trip():
    cfg = DataConfig(train_file="org/name", split="train", eval_split="test", config="en", revision="v1",
                     roles={"bot": "assistant"}, chat_template="chatml")
    assert json.loads(json.dumps(cfg.__dict__))["chat_template"] == "chatml"
    with pytest.raises(ConfigError, match="split=''"):
        DataConfig(train_file="x.jsonl", split="")
