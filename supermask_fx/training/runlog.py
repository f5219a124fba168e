"""What a run tells the user: a tqdm bar on a terminal, plain lines with the time left otherwise, ``metrics.jsonl``;
and what a training script checks in a run folder before it loads any data (``check_run_folder``).

Only the main process prints or writes; the others get a silent ``RunLog``.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path

from ..files.atomic import atomic_file

METRICS_NAME = "metrics.jsonl"
SETTINGS_NAME = "settings.json"
#: How the example scripts treat a run folder, in the one sentence each ``--help`` gives.
RESUME_HELP = (
    "A command whose run folder holds a checkpoint of the same settings continues that run by itself "
    "(after an interruption, run the same command again); a run folder holding a checkpoint of other settings is "
    "refused before any data is loaded, naming the settings that differ."
)


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

    Progress covers the whole run, not one epoch: a tqdm bar over every optimizer step of the run (elapsed time,
    steps per second and the time left, ``[01:10<01:58, ...]``), or plain lines that say the same in words
    (``... (9.9 steps/s, elapsed 1:10, ETA 1:58)``). The time left is the steps still to do at the run's average
    pace so far (tqdm's ``smoothing=0``): evaluation pauses count once an epoch has been evaluated. A resumed run
    counts from where it resumed.

    Args:
        enabled: False on every process but the main one.
        mode: ``"auto"`` (a bar if the output stream is a terminal, else lines), ``"bar"``, ``"lines"`` or
            ``"none"``.
        out_dir: where ``metrics.jsonl`` goes (``None``: nowhere).
        log_every: in lines mode, a line every this many optimizer steps (0: only one per epoch).
        stream: where the bar and the lines go (default ``sys.stdout``, looked up when writing).
    """

    def __init__(self, enabled: bool, mode: str = "auto", out_dir=None, log_every: int = 50, stream=None) -> None:
        self.enabled = enabled
        if mode == "auto":
            mode = "bar" if _draws_bar(stream if stream is not None else sys.stdout) else "lines"
        self.mode = mode if enabled else "none"
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_every = log_every
        self.stream = stream
        self._bar = None
        self._run = None  # (epochs, steps per epoch, steps done before this session, start time) once started
        self._implicit = False
        self._end_lr = None  # the learning rate after the epoch's last optimizer step

    def print(self, message: str) -> None:
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(message, file=self._out())
        else:
            print(message, file=self._out(), flush=True)

    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    # -------------------------------------------------------------------------------- per run

    def start_run(self, epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None:
        """A run of ``epochs`` epochs of ``steps_per_epoch`` optimizer steps, starting after ``start_epoch``."""
        self.end_run()
        self._run = (epochs, steps_per_epoch, start_epoch * steps_per_epoch, time.perf_counter())
        self._done = start_epoch * steps_per_epoch
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=epochs * steps_per_epoch,
                initial=self._done,
                desc=f"epoch {min(start_epoch + 1, epochs)}/{epochs}",
                unit="step",
                smoothing=0,  # the run's average pace: evaluation pauses count in the time left
                leave=False,
                dynamic_ncols=True,
                file=self._out(),
            )

    def end_run(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._run = None
        self._implicit = False

    def timing(self) -> tuple[float, float | None]:
        """``(elapsed seconds, seconds left or None)`` of the run so far, at its average pace."""
        if self._run is None:
            return 0.0, None
        epochs, steps, done0, t0 = self._run
        elapsed = time.perf_counter() - t0
        if self._done <= done0:
            return elapsed, None
        return elapsed, (epochs * steps - self._done) * elapsed / (self._done - done0)

    # -------------------------------------------------------------------------------- per step

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self._run is None:  # ``Run.train_epoch`` called on its own: a run of the epochs from this one
            self.start_run(epochs, steps, epoch)
            self._implicit = True
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._done = epoch * steps
        self._end_lr = None
        self._t0 = time.perf_counter()
        if self._bar is not None:
            self._bar.set_description_str(f"epoch {epoch + 1}/{epochs}", refresh=False)

    def wants_step_stats(self, step_in_epoch: int) -> bool:
        """Whether ``step`` needs the loss value (which costs a device synchronisation): at the progress points,
        and at the epoch's last step (its learning rate goes into the epoch's line)."""
        if self.mode == "none":
            return False
        if step_in_epoch == self._steps:
            return True
        if self.mode == "bar":
            return step_in_epoch % 10 == 0
        return self.log_every > 0 and step_in_epoch % self.log_every == 0

    def step(self, step_in_epoch: int, loss: float | None = None, lr: float | None = None) -> None:
        self._done = self._epoch * self._steps + step_in_epoch
        if lr is not None and step_in_epoch == self._steps:
            self._end_lr = lr
        if self.mode == "bar":
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            self._bar.update(self._done - self._bar.n)
        elif self.mode == "lines" and loss is not None and self.log_every > 0 and step_in_epoch % self.log_every == 0:
            rate = step_in_epoch / max(1e-9, time.perf_counter() - self._t0)
            self.print(
                f"epoch {self._epoch + 1}/{self._epochs} step {step_in_epoch}/{self._steps} "
                f"loss {loss:.4f} lr {lr:.4g} ({rate:.1f} steps/s, {self._elapsed_eta()})"
            )

    def evaluating(self) -> None:
        """Say on the bar that the test set is being evaluated (the step count stands still meanwhile)."""
        if self._bar is not None:
            self._bar.set_description_str(f"epoch {self._epoch + 1}/{self._epochs} (evaluating)")

    def end_epoch(self) -> None:
        if self._implicit:
            self.end_run()

    def _elapsed_eta(self) -> str:
        elapsed, left = self.timing()
        text = f"elapsed {format_duration(elapsed)}"
        if left is not None and self._done < self._run[0] * self._run[1]:
            text += f", ETA {format_duration(left)}"
        return text

    # -------------------------------------------------------------------------------- per epoch

    def epoch(self, metrics: dict) -> None:
        """Print the epoch's line and append its metrics to ``metrics.jsonl``. The line's ``lr a->b``: the rate of
        the epoch's first optimizer step (``metrics["lr"]``) and the rate after its last one."""
        keys = ("epoch", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "epoch_time_s")
        shown = dict(metrics)
        if "lr" in shown and self._end_lr is not None and self._end_lr != shown["lr"]:
            shown["lr"] = f"{_format(float(shown['lr']))}->{_format(float(self._end_lr))}"
        line = format_metrics(shown, keys)
        if self._run is not None:
            line += f"  ({self._elapsed_eta()})"
        self.print(line)
        if self.enabled and self.out_dir is not None:
            path = self.out_dir / METRICS_NAME
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(_jsonable(metrics)) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as error:  # a full disk, permissions: the documented error, naming the file and cause
                from .checkpoint import CheckpointError, write_failure_reason

                raise CheckpointError(
                    f"cannot append to {path}: {write_failure_reason(error, path.parent)}; the last checkpoint is "
                    "intact: fix this and run again to resume (a resumed run rewrites the file from its history)"
                ) from error

    def rewrite(self, history: list[dict]) -> None:
        """Make ``metrics.jsonl`` hold exactly ``history`` (a resumed run drops epochs redone after the kill)."""
        if not (self.enabled and self.out_dir is not None):
            return
        with atomic_file(self.out_dir / METRICS_NAME) as f:
            f.write("".join(json.dumps(_jsonable(m)) + "\n" for m in history).encode("utf-8"))


# ------------------------------------------------------------------------------------------- run folders


def write_run_settings(out_dir, settings: dict) -> None:
    """Record a script's own settings (its command-line flags that change the result) in ``settings.json`` of the
    run folder, for ``check_run_folder`` of a later command. Write it after the first checkpoint (in a callback):
    then the folder is this run's."""
    with atomic_file(Path(out_dir) / SETTINGS_NAME) as f:
        f.write((json.dumps(_jsonable(settings), indent=2, sort_keys=True) + "\n").encode())


def check_run_folder(out_dir, settings: dict | None = None, config=None, *, require: bool = False) -> int | None:
    """Check a run folder before any data is loaded: ``None`` if it holds no checkpoint (a new run starts), else
    the number of epochs its run has done (the run continues).

    A checkpoint made with other settings is refused at once, naming each one that differs: the script's
    ``settings`` (flag name -> value) against the folder's ``settings.json``, or where there is none, ``config`` (a
    ``TrainConfig``) against its ``config.json`` (``RESULT_FIELDS``). A folder without either is not compared here;
    the engine still compares model, settings and data when it loads the checkpoint.

    Raises:
        CheckpointMismatchError: the folder's run was made with other settings.
        CheckpointError: ``require`` (``--resume``) and there is no checkpoint.
    """
    from .checkpoint import CHECKPOINT_NAME, CheckpointError, CheckpointMismatchError

    out = Path(out_dir)
    if not (out / CHECKPOINT_NAME).is_file():
        if require:
            raise CheckpointError(
                f"--resume: {out} holds no checkpoint to continue (without --resume a new run starts there)"
            )
        return None
    differs = []
    saved = _read_json(out / SETTINGS_NAME)
    if settings is not None and isinstance(saved, dict):
        for key, value in settings.items():
            theirs, ours = saved.get(key), _jsonable_value(value)
            if key in saved and theirs != ours:
                differs.append(f"--{key.replace('_', '-')} {_show(theirs)} there, {_show(ours)} now")
    saved_config = _read_json(out / "config.json")
    compared = settings is not None and isinstance(saved, dict)
    if config is not None and not compared and isinstance(saved_config, dict):  # the script's flags say more
        for key, value in config.result_fields().items():
            theirs, ours = saved_config.get(key), _jsonable_value(value)
            if key in saved_config and theirs != ours:
                differs.append(f"{key} {_show(theirs)} there, {_show(ours)} now")
    if differs:
        raise CheckpointMismatchError(
            f"{out} holds a run made with other settings ({'; '.join(differs)}). Rerun with its settings to continue "
            f"it, or give this run another --out (or delete {out} to discard that run)."
        )
    try:
        return len(read_metrics(out / METRICS_NAME))
    except (OSError, ValueError):
        return 0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonable_value(value):
    return json.loads(json.dumps(value, default=str))


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (as tqdm writes times)."""
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_metrics(path) -> list[dict]:
    """The per-epoch records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _draws_bar(stream) -> bool:
    """Whether a bar would be seen on ``stream``: a terminal with a width (a pseudo-terminal opened without a
    size, as by ``script`` or some CI runners, reports 0 columns, and tqdm then draws nothing at all)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return True  # a terminal whose size cannot be asked: let tqdm decide
