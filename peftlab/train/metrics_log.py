"""metrics.jsonl, the record of a run that every trainer and every method that takes over a run writes alike."""

from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    """metrics.jsonl in `output_dir` (appended, one JSON object per line) and, if asked and available, TensorBoard
    scalars under output_dir/tb (`<split>/<key>` per numeric value)."""

    def __init__(self, output_dir: str, tensorboard: bool) -> None:
        self.fh = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
            except ImportError:  # tensorboard is optional; metrics.jsonl has the same numbers
                self.tb = None

    def write(self, record: dict) -> None:
        # NaN/inf written by json.dumps are not JSON (`NaN` is a JavaScript literal): such a value becomes null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.fh.write(json.dumps(record, allow_nan=False) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["MetricsLogger"]
