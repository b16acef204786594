"""Run by tests/test_distributed.py under `accelerate launch`: train from a YAML run config."""

import sys

from peftlab.train import load_run_config, train

if __name__ == "__main__":
    train(load_run_config(sys.argv[1], sys.argv[2:]), log=lambda *_: None)
