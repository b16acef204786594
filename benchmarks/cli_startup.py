"""Wall time of the answers `peftlab` gives before importing torch: `--help`, `train --help`, config errors.

Each command runs in a fresh interpreter (`python -m peftlab.cli.main ...`), `--repeats` times; the median and the
fastest wall time are printed with the machine's load average (these figures mean little on a busy machine), and
whether torch was imported (python -X importtime shows it). The target (issue 15): under 1 s on an idle machine.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def cases(folder: str) -> list[tuple[str, list[str]]]:
    def config(name: str, text: str) -> str:
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("data: {train_file: rows.jsonl}\n" + text)
        return path

    return [
        ("peftlab --help", ["--help"]),
        ("peftlab train --help", ["train", "--help"]),
        ("missing config file", ["train", os.path.join(folder, "missing.yaml")]),
        ("unknown key train.learning_rate", ["train", config("key.yaml", "train: {learning_rate: 1.0e-4}\n")]),
        ("bad value method.r=-1", ["train", config("value.yaml", "method: {name: lora, r: -1}\n")]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as folder:
        for label, argv in cases(folder):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "peftlab.cli.main", *argv],
                                      capture_output=True, text=True)
                times.append(time.perf_counter() - start)
            torch = any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())
            print(f"{label:34s} exit {proc.returncode}  median {statistics.median(times):.3f} s  "
                  f"fastest {min(times):.3f} s  torch imported: {'yes' if torch else 'no'}")


if __name__ == "__main__":
    main()
