"""`peftlab compare`: several methods on one task with the same data and budget, one table and two plots.

config.py reads and checks the compare config (shared run-config sections + a `methods:` list), runner.py runs
each method in its own worker process (worker.py) and report.py writes results.md, results.csv,
score_vs_params.png and loss_curves.png (into OUTPUT_DIR/report/, swapped in whole). See docs/compare.md.
"""

from .config import CompareConfig, Entry, build_compare_config, default_compare_config_path, load_compare_config
from .runner import run_compare

__all__ = ["CompareConfig", "Entry", "build_compare_config", "default_compare_config_path", "load_compare_config",
           "run_compare"]
