"""What a run tells the user: a tqdm bar on a terminal, plain lines otherwise, and ``metrics.jsonl``.

Only the main process prints or writes; the others get a silent ``RunLog``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from ..atomic import atomic_file

METRICS_NAME = "metrics.jsonl"


def _format(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def format_metrics(metrics: dict, keys: tuple[str, ...] | None = None) -> str:
    keys = keys or tuple(metrics)
    return "  ".join(f"{k} {_format(metrics[k])}" for k in keys if k in metrics)


class RunLog:
    """Console output and the metrics file of one run.

    Args:
        enabled: False on every process but the main one.
        mode: ``"auto"`` (bar if stderr is a terminal, else lines), ``"bar"``, ``"lines"`` or ``"none"``.
        out_dir: where ``metrics.jsonl`` goes (``None``: nowhere).
        log_every: in lines mode, a line every this many optimizer steps (0: none within an epoch).
        stream: where lines go (default ``sys.stdout``).
    """

    def __init__(self, enabled: bool, mode: str = "auto", out_dir=None, log_every: int = 50, stream=None) -> None:
        self.enabled = enabled
        if mode == "auto":
            mode = "bar" if _isatty(sys.stderr) else "lines"
        self.mode = mode if enabled else "none"
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_every = log_every
        self.stream = stream
        self._bar = None

    def print(self, message: str) -> None:
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=self.stream or sys.stdout, flush=True)

    # -------------------------------------------------------------------------------- per step

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._t0 = time.perf_counter()
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True
            )

    def wants_step_stats(self, step_in_epoch: int) -> bool:
        """Whether ``step`` needs the loss value (which costs a device synchronisation)."""
        if self.mode == "bar":
            return step_in_epoch % 10 == 0 or step_in_epoch == self._steps
        if self.mode == "lines":
            return self.log_every > 0 and step_in_epoch % self.log_every == 0
        return False

    def step(self, step_in_epoch: int, loss: float | None = None, lr: float | None = None) -> None:
        if self.mode == "bar":
            self._bar.update(step_in_epoch - self._bar.n)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
        elif self.mode == "lines" and loss is not None:
            rate = step_in_epoch / max(1e-9, time.perf_counter() - self._t0)
            self.print(
                f"epoch {self._epoch + 1}/{self._epochs} step {step_in_epoch}/{self._steps} "
                f"loss {loss:.4f} lr {lr:.4g} ({rate:.1f} steps/s)"
            )

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -------------------------------------------------------------------------------- per epoch

    def epoch(self, metrics: dict) -> None:
        keys = ("epoch", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "epoch_time_s")
        self.print(format_metrics(metrics, keys))
        if self.enabled and self.out_dir is not None:
            with open(self.out_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(metrics)) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def rewrite(self, history: list[dict]) -> None:
        """Make ``metrics.jsonl`` hold exactly ``history`` (a resumed run drops epochs redone after the kill)."""
        if not (self.enabled and self.out_dir is not None):
            return
        with atomic_file(self.out_dir / METRICS_NAME) as f:
            f.write("".join(json.dumps(_jsonable(m)) + "\n" for m in history).encode("utf-8"))


def read_metrics(path) -> list[dict]:
    """The per-epoch records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
