"""Forward time of the test suite's tiny models (tests/conftest.py) with torch's default thread count and with one
thread, the setting of tests/conftest.py's `one_thread` fixture. Run on a busy machine to see why (OpenMP threads wait
for cores):

    .venv/bin/python benchmarks/tiny_forward_threads.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import BUILDERS, model_inputs, output_of  # noqa: E402


def ms_per_forward(model, x, repeats: int = 20) -> float:
    output_of(model, x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        output_of(model, x)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    import os

    cores = os.cpu_count() or 1
    print(f"cores {cores}, load average {os.getloadavg()[0]:.2f}")
    for threads in (cores, 1):
        torch.set_num_threads(threads)
        cells = [f"{kind} {ms_per_forward(BUILDERS[kind](), model_inputs(kind)):.1f} ms" for kind in sorted(BUILDERS)]
        print(f"{threads} thread(s): " + ", ".join(cells))


if __name__ == "__main__":
    main()
