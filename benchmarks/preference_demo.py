"""Judge preference-tuned policies: generate reviews before and after DPO / PPO and score them two ways.

    peftlab train                                      # out/default: the sentiment classifier (Rotten Tomatoes)
    peftlab train configs/reward_movie_reviews.yaml    # out/reward_movie_reviews: the reward model
    peftlab train configs/dpo_movie_reviews.yaml       # out/dpo_movie_reviews
    peftlab train configs/ppo_movie_reviews.yaml       # out/ppo_movie_reviews (reads the reward adapter)
    python benchmarks/preference_demo.py --policy dpo=out/dpo_movie_reviews --policy ppo=out/ppo_movie_reviews

Every policy (the base with adapters disabled, then each --policy adapter, all on one loaded base) answers the same
prompt ("Write a positive movie review:", in the chat template as training formatted it) --n times, sampled with
the same seed per policy (temperature 1.0, as PPO samples), up to --max-new-tokens tokens. Each answer is judged by
- the sentiment classifier of a `task: classify` run (--classifier, default out/default, trained on Rotten Tomatoes
  reviews, labels negative/positive): the fraction judged positive and the mean P(positive);
- the reward model of a `task: reward` run (--reward, default out/reward_movie_reviews), optional: the mean score.
The classifier never saw the preference pairs or the reward model, so it is an independent judge of "positive".
Prints a table and a few answers per policy; --out writes results.json and results.md there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PROMPT = "Write a positive movie review:"


def adapter_folder(path: str) -> str:
    """A run folder (with adapter/) or an adapter folder itself."""
    inner = os.path.join(path, "adapter")
    return inner if os.path.isfile(os.path.join(inner, "adapter_config.json")) else path


def generate(model, tokenizer, prompt_ids: list[int], n: int, max_new_tokens: int, seed: int, batch: int):
    import torch

    texts, lengths = [], []
    torch.manual_seed(seed)
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        ids = torch.tensor([prompt_ids] * rows)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, len(prompt_ids):].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            lengths.append(len(row))
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip() or "(empty)")
    return texts, lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", action="append", default=[], metavar="NAME=DIR",
                   help="a policy adapter (run folder or adapter folder); repeat for several")
    p.add_argument("--model", default=None, help="base model (default: the first policy run's `model:`, or smollm2)")
    p.add_argument("--classifier", default="out/default", help="a task: classify run folder (the judge)")
    p.add_argument("--positive-label", default="positive", help="the classifier's label meaning positive")
    p.add_argument("--reward", default="out/reward_movie_reviews", help="a task: reward run folder ('' to skip)")
    p.add_argument("--n", type=int, default=32, help="answers per policy")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=3, help="answers printed per policy")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = p.parse_args(argv)

    import yaml

    from peftlab.core.model import PeftModel
    from peftlab.train import TextClassifier
    from peftlab.train.model_loading import load_tokenizer_and_model
    from peftlab.train.ppo import encode_prompt
    from peftlab.train.preference import RewardModel

    policies = []
    for item in args.policy:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--policy {item!r}: give NAME=DIR, e.g. dpo=out/dpo_movie_reviews")
        folder = adapter_folder(path)
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            p.error(f"--policy {item!r}: no adapter_config.json in {folder}; train that run first")
        policies.append((name, folder, path))
    model_name = args.model
    if model_name is None:
        for _, _, path in policies:
            cfg = os.path.join(path, "run_config.yaml")
            if os.path.isfile(cfg):
                with open(cfg, encoding="utf-8") as fh:
                    model_name = yaml.safe_load(fh)["model"]
                if isinstance(model_name, dict):  # model: {name, dtype} (the section form)
                    model_name = model_name.get("name")
                break
    model_name = model_name or "smollm2"

    t0 = time.perf_counter()
    tokenizer, base = load_tokenizer_and_model(model_name, "AutoModelForCausalLM")
    prompt_ids = encode_prompt(tokenizer, PROMPT, None, 512)
    answers = {"base": None}
    net = base.eval()
    if policies:  # every policy adapter on the one base; "base" = adapters disabled
        net = PeftModel.from_pretrained(base, policies[0][1], adapter_name=policies[0][0]).eval()
        for name, folder, _ in policies[1:]:
            net.load_adapter(folder, adapter_name=name)
        with net.disable_adapter():
            answers["base"] = generate(net, tokenizer, prompt_ids, args.n, args.max_new_tokens, args.seed, args.batch)
        for name, _, _ in policies:
            net.set_adapter(name)
            answers[name] = generate(net, tokenizer, prompt_ids, args.n, args.max_new_tokens, args.seed, args.batch)
    else:
        answers["base"] = generate(net, tokenizer, prompt_ids, args.n, args.max_new_tokens, args.seed, args.batch)
    gen_s = time.perf_counter() - t0
    del net, base

    classifier = TextClassifier.from_run(args.classifier)
    if args.positive_label not in classifier.labels:
        p.error(f"--positive-label {args.positive_label!r} is not one of the classifier's labels {classifier.labels}")
    positive = classifier.labels.index(args.positive_label)
    reward = RewardModel.from_run(args.reward) if args.reward else None

    rows = []
    for name, (texts, lengths) in answers.items():
        p_pos = classifier.predict_proba(texts)[:, positive]
        row = {"policy": name, "n": len(texts), "positive_fraction": float((p_pos > 0.5).float().mean()),
               "mean_p_positive": float(p_pos.mean()), "mean_tokens": statistics.mean(lengths),
               "examples": texts[:args.show]}
        if reward is not None:
            row["mean_reward"] = float(reward.score([PROMPT] * len(texts), texts).mean())
        rows.append(row)

    header = ["policy", "n", "judged positive", "mean P(positive)"] + (["mean reward"] if reward else []) + \
        ["mean tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["policy"], str(r["n"]), f"{r['positive_fraction']:.2f}", f"{r['mean_p_positive']:.3f}"]
        cells += [f"{r['mean_reward']:+.3f}"] if reward else []
        cells += [f"{r['mean_tokens']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    for r in rows:
        print(f"\n{r['policy']}:")
        for text in r["examples"]:
            print("  - " + text.replace("\n", " ")[:200])
    print(f"\n(model {model_name}; {args.n} answers per policy, seed {args.seed}, up to {args.max_new_tokens} new "
          f"tokens; generation {gen_s:.0f} s, total {time.perf_counter() - t0:.0f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"model": model_name, "prompt": PROMPT, "n": args.n, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "classifier": args.classifier, "reward": args.reward,
                "policies": {name: folder for name, folder, _ in policies}, "argv": sys.argv[1:]}
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
