"""Metric writers: metrics.jsonl, TensorBoard, a console line (the step sums the metrics on
device: ``irg_jax.train.setup``)."""

import json
import pathlib
import time

import numpy as np
from absl import logging


class MetricWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events; only the primary process writes."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", float(v), int(step))

    def write_image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc_uint8, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class ProgressLine:
    """A console line with step rate and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.time()

    def line(self, step: int, scalars: dict[str, float]) -> str:
        done = step - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                         if k in ("loss", "ce", "mse", "grad_norm", "lr", "tokens_per_s", "mfu"))
        return f"step {step}/{self.total} {shown} | {rate:.2f} steps/s, ETA {eta / 60:.1f} min"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        logging.info(self.line(step, scalars))
