"""One method of a comparison, in its own process: `python -m peftlab.compare.worker CONFIG.yaml RESULT.json`.

Runs `peftlab.train.train` on the run config (exactly what `peftlab train CONFIG.yaml` would do) and writes one
JSON file with the scores and costs. Running in a process of its own means a crash, an out-of-memory kill or a
leaked tensor in one method cannot touch the others, and the peak memory measured is this method's alone.

Exit status 0 with status "ok"; 1 with status "error" and the traceback on stderr (the per-method log); a kill
(SIGKILL from the OOM killer) writes nothing, and the parent records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM (from /proc/self/status) first: getrusage's ru_maxrss carries the parent's peak over an exec
    (measured here: a child of an 800 MiB parent reports ru_maxrss 808 MiB at start, VmHWM 11 MiB), so a small
    method run from a compare process that has loaded torch would be charged for the parent's memory.
    ru_maxrss (KiB on Linux, bytes on macOS) where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def folder_bytes(folder: str) -> int | None:
    """Total size of the files under `folder` (the saved adapter), or None when it does not exist."""
    if not folder or not os.path.isdir(folder):
        return None
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def write_json(path: str, data: dict) -> None:
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def run(config_path: str, result_path: str, label: str, started: float, generate_max_tokens: int = 0,
        generate_base: bool = False) -> int:
    result: dict = {"label": label, "config_file": config_path,
                    "python": platform.python_version(), "host_cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        import torch

        from ..train import load_run_config, train
        from .config import fingerprint

        run_config = load_run_config(config_path)
        result.update(method=run_config.method_name, task=run_config.task,
                      fingerprint=fingerprint(run_config, generate_max_tokens),
                      device="cuda" if torch.cuda.is_available() else "cpu", torch=torch.__version__)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = train(run_config)
        result.update(
            status="ok", before=out.get("before"), after=out.get("after"), steps=out.get("steps"),
            train_seconds=out.get("train_seconds"), tokens_per_s=out.get("tokens_per_s"),
            trainable_params=out.get("trainable_params"), all_params=out.get("all_params"),
            adapter_dir=out.get("adapter_dir"), adapter_bytes=folder_bytes(out.get("adapter_dir")),
            stopped_early=out.get("stopped_early"),
            # Row counts and (classify) label counts of the train and eval splits: the report's intervals need the
            # number of eval rows, its majority-class line the eval labels.
            data={k: v for k, v in (out.get("data") or {}).items() if k in ("counts", "labels", "label_counts")})
        if generate_max_tokens and out.get("adapter_dir") and _saves_weights(run_config):
            from ..train.generation_metrics import score_saved_run

            t0 = time.perf_counter()
            result["generation"] = score_saved_run(run_config, out["adapter_dir"], generate_max_tokens,
                                                   base=generate_base)
            result["generation"]["seconds"] = time.perf_counter() - t0
        code = 0
    except Exception as err:  # noqa: BLE001 - every failure becomes a row in the table; the traceback goes to the log
        traceback.print_exc()
        result.update(status="error", error=first_line(err))
        code = 1
    result["peak_rss_bytes"] = peak_rss_bytes()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kept beside it: max(this process, its parent's)
    result["ru_maxrss_bytes"] = maxrss if sys.platform == "darwin" else maxrss * 1024
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        result["peak_cuda_bytes"] = int(sys.modules["torch"].cuda.max_memory_allocated())
    result["wall_seconds"] = time.time() - started  # from the parent's spawn: includes imports and model loading
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(result_path, result)
    print(f"compare worker: {label}: {result['status']} in {result['wall_seconds']:.1f} s; "
          f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return code


def _saves_weights(run_config) -> bool:
    """A weight adapter (loadable for generation); methods with their own `run` (icl, features) save none."""
    from ..core.method import method_for_config

    return method_for_config(run_config.method).run is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.compare.worker", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the method's complete run config (YAML)")
    parser.add_argument("result", help="where to write the result JSON")
    parser.add_argument("--label", default=None, help="the method's label in the comparison")
    parser.add_argument("--started", type=float, default=None, help="the parent's time.time() at spawn")
    parser.add_argument("--generate-max-tokens", type=int, default=0,
                        help="causal_lm/sft: score greedy continuations of the eval prompts (compare/config.py)")
    parser.add_argument("--generate-base", action="store_true",
                        help="with --generate-max-tokens: also score the base model (adapters off), for the table's "
                             "base row (the runner asks until one method of the comparison has it)")
    args = parser.parse_args(argv)
    return run(args.config, args.result, args.label or os.path.basename(os.path.dirname(args.result)),
               args.started or time.time(), args.generate_max_tokens, args.generate_base)


if __name__ == "__main__":
    sys.exit(main())
