"""`peftlab compare`: several methods on one task with the same data and budget, one table and three plots.

config.py reads and checks the compare config (shared run-config sections + a `methods:` list, `seeds:`,
`generate_max_tokens:`), runner.py runs each (method, seed) in its own worker process (worker.py), report.py writes
results.md and results.csv (scores with intervals from stats.py, reference rows) and plots.py score_vs_params.png,
loss_curves.png and score_vs_cost.png (into OUTPUT_DIR/report/, swapped in whole). See docs/compare.md.
"""

from .config import CompareConfig, Entry, build_compare_config, default_compare_config_path, load_compare_config
from .runner import run_compare

__all__ = ["CompareConfig", "Entry", "build_compare_config", "default_compare_config_path", "load_compare_config",
           "run_compare"]
