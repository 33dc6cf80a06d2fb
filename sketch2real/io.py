"""Atomic file writes: a crash or a kill never leaves a half-written file behind a final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is renamed onto `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file for writing; it replaces `path` only when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object per line (keys sorted, so equal data gives equal bytes), atomically."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a truncated last line (a killed writer) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync: a kill loses at most the rows being written (a torn last line is ignored on read)."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def part_files(folder: Path, stem: str) -> list[Path]:
    """The per-rank part files `<stem>.rankNNN.jsonl` of a data-parallel job."""
    return sorted(Path(folder).glob(f"{stem}.rank*.jsonl"))


def read_with_parts(folder: Path, stem: str) -> list[dict]:
    """Rows of `<stem>.jsonl` and of every rank's part file (what a killed job had written)."""
    rows = []
    for file in [Path(folder) / f"{stem}.jsonl", *part_files(folder, stem)]:
        if file.is_file():
            rows += read_jsonl(file)
    return rows


def merge_parts(folder: Path, stem: str, key: Callable[[dict], Any], keep: Callable[[dict], bool] = lambda row: True) -> list[dict]:
    """Fold the part files into `<stem>.jsonl`: one row per key (the newest), sorted by key; parts removed."""
    by_key = {key(row): row for row in read_with_parts(folder, stem) if keep(row)}
    rows = [by_key[k] for k in sorted(by_key)]
    write_jsonl(Path(folder) / f"{stem}.jsonl", rows)
    for file in part_files(folder, stem):
        file.unlink()
    return rows
