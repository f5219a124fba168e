"""The results CSV: one row per finished run, appended atomically, read back to skip done runs."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .specs import KEY_FIELDS, RunSpec

__all__ = ["COLUMNS", "append_curve", "append_row", "curves_path", "done_keys", "read_curves", "read_rows", "row_key"]

#: Column order of the CSV. Spec columns first (``KEY_FIELDS`` identify a run), then results.
COLUMNS: tuple[str, ...] = (
    "experiment",
    *KEY_FIELDS,
    "test_accuracy",
    "kept_weights",
    "total_weights",
    "found_accuracy",
    "wall_time_s",
    "git_revision",
    "engine",
    "finished_at",
)


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row.get(name, "") for name in KEY_FIELDS)


def _line(values: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _append(path: Path, text: str, header: str = "") -> None:
    """One ``write`` on an ``O_APPEND`` descriptor, then ``fsync`` (``header`` first if the file is empty)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            text = header + text
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def curves_path(csv_path: str | Path) -> Path:
    """Where the per-epoch test accuracies of the runs in ``csv_path`` go: ``curves.jsonl`` beside it."""
    return Path(csv_path).with_name("curves.jsonl")


def append_curve(path: str | Path, spec: RunSpec, curve: list[float]) -> None:
    """One JSON line: the run's key fields and its per-epoch top-1 test accuracy in % (``test_top1``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**{name: spec.row_fields()[name] for name in KEY_FIELDS}, "test_top1": [round(a, 2) for a in curve]}
    _append(path, json.dumps(record) + "\n")


def read_curves(path: str | Path) -> dict[tuple[str, ...], list[float]]:
    """Run key -> per-epoch test accuracies (the last line of a key wins; a torn last line is ignored)."""
    path = Path(path)
    out: dict[tuple[str, ...], list[float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[row_key(record)] = [float(a) for a in record["test_top1"]]
    return out


def append_row(path: str | Path, spec: RunSpec, results: dict[str, object]) -> dict[str, str]:
    """Append one run's row (header first if the file is new or empty) with a single ``write`` on an
    ``O_APPEND`` descriptor, then ``fsync``: a crash loses at most the run in progress, never half a row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = dict(spec.row_fields())
    row.update({name: "" if value is None else str(value) for name, value in results.items()})
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown result columns {unknown}")
    _append(path, _line([row.get(name, "") for name in COLUMNS]), header=_line(list(COLUMNS)))
    return row


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All complete rows of the CSV (a torn last line without its newline is ignored); [] if no file."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    return [row for row in rows if row.get("test_accuracy", "") != ""]


def done_keys(path: str | Path) -> set[tuple[str, ...]]:
    return {row_key(row) for row in read_rows(path)}
