"""PPO's reward: a `task: reward` adapter loaded onto the policy's causal-LM base as adapter "reward", with its score
head, and the score of a rollout read from it as the reward model was trained (prompt text + decoded response
re-encoded as an sft prompt/response row, right-padded, the head read at the last attended token). The Python API
takes a reward function instead (RewardFn)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import torch
import yaml
from torch import nn

from ...core.config import ConfigError, TaskType
from ...core.model import PeftModel, read_config
from ...data import DataConfig
from ...io import adapter_files
from ..preference import last_attended_index, scoring_batch
from .prompts import pad_rows

POLICY, REWARD = "policy", "reward"
# Names of a sequence-classification head in transformers models (LlamaForSequenceClassification and most decoders:
# `score`; BERT-likes: `classifier`). In an adapter file the head sits at base_model.model.<name>.weight.
HEAD_NAMES = ("score", "classifier")

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]
"""reward_fn(prompts, responses, response_ids) -> one float per rollout. responses are decoded without special
tokens; response_ids are the generated ids before the EOS (the EOS itself left out)."""


def reward_encoding(folder: str, fallback_max_length: int) -> DataConfig:
    """How the reward run encoded prompt + response: the prompt_template and max_length of its run_config.yaml
    (beside its adapter folder, or in it); without one, the chat template / plain prompt and a length that never
    cuts a rollout."""
    values = {}
    for path in (os.path.join(os.path.dirname(os.path.abspath(folder)), "run_config.yaml"),
                 os.path.join(folder, "run_config.yaml")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                data = (yaml.safe_load(fh) or {}).get("data") or {}
            values = {k: data[k] for k in ("prompt_template", "max_length") if data.get(k) is not None}
            break
    values.setdefault("max_length", fallback_max_length)
    return DataConfig(train_file="<ppo rollouts>", **values)


def resolve_reward_folder(path: str) -> str:
    """The folder holding the reward adapter's files: `path`, or `path`/adapter (a run's output_dir)."""
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded):
        raise ConfigError(f"ppo.reward_adapter={path!r}: no such folder (absolute: {os.path.abspath(expanded)}). "
                          f"Train the reward model first (`peftlab train configs/reward_movie_reviews.yaml` writes "
                          f"its adapter to that run's output_dir/adapter) and point reward_adapter at it.")
    if not os.path.isfile(os.path.join(expanded, "adapter_config.json")) and \
            os.path.isfile(os.path.join(expanded, "adapter", "adapter_config.json")):
        return os.path.join(expanded, "adapter")
    return expanded


def _same_model(a: str | None, b: str | None) -> bool:
    def norm(name):
        path = os.path.expanduser(name)
        return os.path.realpath(path) if os.path.exists(path) else name.rstrip("/")
    return a is None or b is None or norm(a) == norm(b)


def load_reward_adapter(peft_model: PeftModel, path: str, check_base: bool = True) -> nn.Linear:
    """Load a `task: reward` adapter onto `peft_model` (a causal LM) as adapter "reward" and return its score head
    as a frozen Linear(hidden, 1). Everything is checked before the model changes; the policy stays active."""
    folder = resolve_reward_folder(path)
    where = f"ppo.reward_adapter ({folder})"
    try:
        config = read_config(folder)
        weights = adapter_files.read_weights(folder)
    except (adapter_files.AdapterFileError, ConfigError) as err:
        raise ConfigError(f"{where}: {err}") from None
    heads = [h for h in HEAD_NAMES if f"{adapter_files.KEY_PREFIX}{h}.weight" in weights]
    if not heads:
        names = ", ".join(f"{h}.weight" for h in HEAD_NAMES)
        raise ConfigError(f"{where} holds no sequence-classification head ({names}"
                          f"), so it is not a reward model's adapter (task_type {config.task_type}). Train one with "
                          f"`task: reward`, whose score head is saved with the adapter.")
    key = f"{adapter_files.KEY_PREFIX}{heads[0]}"
    head_w, head_b = weights.pop(f"{key}.weight"), weights.pop(f"{key}.bias", None)
    base = peft_model.get_base_model()
    hidden = base.config.get_text_config().hidden_size
    if head_w.shape != (1, hidden):
        raise ConfigError(f"{where}: its head {heads[0]}.weight has shape {tuple(head_w.shape)}; a reward model's head "
                          f"is (1, {hidden}) for this base (num_labels=1, hidden size {hidden}). A head with more "
                          f"rows is a classifier, and another hidden size means another base model.")
    ours = getattr(base.config, "_name_or_path", None)
    if check_base and not _same_model(config.base_model_name_or_path, ours):
        raise ConfigError(f"{where} was trained on base model {config.base_model_name_or_path!r}, but this run's base "
                          f"is {ours!r}; a reward adapter only means something on the weights it was trained on. "
                          f"Train the reward model with the same `model:`, or set ppo.check_reward_base: false if "
                          f"both names hold the same weights.")
    if getattr(config, "bias", "none") != "none":
        raise ConfigError(f"{where} trains the base model's biases (bias={config.bias!r}); loading it would change "
                          "the base that the policy and the reference share. Use a reward adapter with bias: none.")
    keep = [m for m in (config.modules_to_save or []) if m not in HEAD_NAMES] or None
    config = dataclasses.replace(config, modules_to_save=keep, task_type=TaskType.CAUSAL_LM, inference_mode=True)
    try:
        peft_model.add_adapter(REWARD, config)
    except ConfigError as err:
        raise ConfigError(f"{where} cannot sit beside the policy adapter on one model: {err} Use the same method "
                          f"for the policy as the reward adapter ({peft_model.method_of(POLICY).name} vs "
                          f"{type(config).__name__}), or target other modules.") from None
    try:
        own = peft_model.adapter_tensors(REWARD)
        extra = sorted(set(weights) - set(own))
        if extra:
            raise ConfigError(f"{where} carries tensors beyond its adapter ({', '.join(extra[:4])}"
                              f"{', ...' if len(extra) > 4 else ''}), e.g. embedding or base weights; loading them "
                              "would overwrite the base that the policy and the reference share.")
        try:
            peft_model.load_tensors(REWARD, weights, folder)
        except adapter_files.AdapterFileError as err:
            raise ConfigError(f"ppo.reward_adapter: {err}") from None
    except BaseException:
        peft_model.delete_adapter(REWARD)
        raise
    peft_model.set_adapter(POLICY)
    head = nn.Linear(hidden, 1, bias=head_b is not None)
    with torch.no_grad():
        head.weight.copy_(head_w.float())
        if head_b is not None:
            head.bias.copy_(head_b.float())
    return head.requires_grad_(False)



@torch.no_grad()
def adapter_scores(peft_model: PeftModel, head: nn.Linear, tokenizer, data: DataConfig, prompts: list[str],
                   texts: list[str], autocast) -> torch.Tensor:
    """The reward adapter's score of each (prompt, response text) (B,): encoded as the reward run encoded its pairs
    (`data`: reward_encoding's), right-padded, adapter "reward" active for this forward only (the policy after it,
    also on an error), `head` read at the last attended token. `autocast`: a context manager factory (the
    run's Accelerator.autocast)."""
    encoded = scoring_batch(list(prompts), texts, tokenizer, data)
    device = head.weight.device
    ids, attn = pad_rows([e["input_ids"] for e in encoded], tokenizer.pad_token_id, left=False)
    ids, attn = ids.to(device), attn.to(device)
    peft_model.set_adapter(REWARD)
    try:
        with autocast():
            out = peft_model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True,
                             logits_to_keep=1)
    finally:
        peft_model.set_adapter(POLICY)
    rows_index = torch.arange(ids.shape[0], device=ids.device)
    hidden = out.hidden_states[-1][rows_index, last_attended_index(attn)]  # (B, H)
    return head(hidden.float()).squeeze(-1)


__all__ = ["HEAD_NAMES", "POLICY", "REWARD", "RewardFn", "adapter_scores", "load_reward_adapter",
           "resolve_reward_folder", "reward_encoding"]
