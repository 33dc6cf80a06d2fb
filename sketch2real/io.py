"""Atomic file writes: a crash or a kill never leaves a half-written file behind a final name; and the resume rule of
the data-parallel jobs that add to a folder (captioning, generation): only outputs of the same settings are kept."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from sketch2real.cli import UserError


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(path: str | os.PathLike) -> None:
    """Give a tree made by `tempfile` (0700 folders, 0600 files) the modes the umask gives to ordinary writes."""
    mask = current_umask()
    root = Path(path)
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~mask)
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is renamed onto `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    mode = 0o666 & ~current_umask()  # mkstemp makes 0600: the file gets the mode open() would give it
    os.chmod(tmp, mode)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors' save_file) makes it 0600 again
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def link_identical_files(copy: str | os.PathLike, original: str | os.PathLike) -> int:
    """Make each weights file under `copy` that holds the same bytes as its namesake under `original` a hard link to
    it (a pipeline saved twice: its frozen components once on disk, each folder still loading alone); returns the
    bytes freed. Where a link cannot be made (another file system) the copy stays."""
    import filecmp

    freed = 0
    for path in sorted(Path(copy).rglob("*.safetensors")):  # written whole and replaced, never edited in place
        twin = Path(original) / path.relative_to(copy)
        if not path.is_file() or path.is_symlink() or not twin.is_file() or path.samefile(twin):
            continue
        if not filecmp.cmp(path, twin, shallow=False):
            continue
        link = path.with_name(f".{path.name}.link.tmp")
        try:
            os.link(twin, link)
            os.replace(link, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(link)
            continue
        freed += twin.stat().st_size
    return freed


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header with its metadata keys in sorted order: safetensors' writer orders them by
    a hash seeded per process, so two runs' files of the same tensors and metadata differed in bytes (the same length:
    the header is replaced in place of itself, atomically)."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if not isinstance(header.get("__metadata__"), dict):
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # another writer's spelling (escapes): left as it is
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data[:8] + text + b" " * (size - len(text)) + data[8 + size:])


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file for writing; it replaces `path` only when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def strict_json(data: Any) -> Any:
    """`data` with every NaN or infinite float as None: JSON has no NaN (Python writes a bare `NaN` that jq, JavaScript
    and strict parsers refuse); null is "no value" to all of them. numpy reads None back as nan (`dtype=float`)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented, key-sorted, strict JSON (`strict_json`), atomically."""
    with atomic_open(path) as f:
        json.dump(strict_json(data), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object per line (keys sorted, so equal data gives equal bytes; strict JSON: a NaN is null),
    atomically."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(strict_json(row), sort_keys=True, allow_nan=False) + "\n")


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = (), text: Sequence[str] = ()) -> list[dict]:
    """Read a JSONL file of objects (UTF-8, a BOM an editor put first skipped); a last line cut short (a killed
    writer: no newline after it) is ignored. Any other line that is not a JSON object, lacks a key of `required`, or
    holds something else than a string under a key of `text`, is one line naming the file and the line
    (`UserError`): a corrupt row is not dropped silently, nor a hand-edited last one."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            content = f.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") from None
    # lines end at "\n" alone: str.splitlines() also splits at U+2028 and U+0085, which JSON strings may hold raw
    lines = [(number, line.strip()) for number, line in enumerate(content.split("\n"), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if index == len(lines) - 1 and not content.endswith("\n"):  # said: an editor's last line ends so too
                logging.getLogger("sketch2real").warning("%s, line %d: not a JSON row (%s), left out: a write cut short",
                                                         path, number, err.msg)
                continue
            raise UserError(f"{path}, line {number}: not a JSON row ({err.msg})") from None
        missing = [key for key in required if key not in row] if isinstance(row, dict) else None
        if missing is None or missing:
            what = f"no {', '.join(missing)}" if missing else f"a {type(row).__name__}, not an object"
            raise UserError(f"{path}, line {number}: {what} (rows need {', '.join(required) or 'to be objects'})")
        wrong = next((key for key in text if key in row and not isinstance(row[key], str)), None)
        if wrong:
            raise UserError(f"{path}, line {number}: {wrong} is {json.dumps(row[wrong])}, not a string")
        rows.append(row)
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync: a kill loses at most the rows being written. A torn last line (a kill or a full disk
    mid-write) is cut off first: a row appended to it would be lost with it on read. Strict JSON, as `write_jsonl`."""
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(max(0, end - 1))
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(strict_json(row), sort_keys=True, allow_nan=False) + "\n")
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


def key_path(folder: str | os.PathLike, key: str, suffix: str = "") -> Path:
    """`folder/<key><suffix>` for a key that comes from data (Sketchy's keys are `category/name`).

    Keys never leave their folder: an empty, absolute or NUL-holding key, a backslash, or a `.`/`..`/empty
    path component is refused in one line (a crafted captions row or shard must not write elsewhere).
    """
    parts = key.split("/") if isinstance(key, str) else []
    if (not parts or "\0" in key or "\\" in key or key.startswith("/")
            or any(part in ("", ".", "..") for part in parts)):
        raise UserError(f"refusing key {key!r}: a key from data must be a relative name without '..', "
                        "empty parts, backslashes or NUL")
    return Path(folder).joinpath(*parts[:-1], parts[-1] + suffix)


def human_bytes(n: float) -> str:
    """A size as people read it: GiB, MiB or KiB, whichever keeps it above 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def check_room(folder: str | os.PathLike, needed: int, what: str, hint: str = "") -> None:
    """One line before writing when `needed` bytes will not fit on `folder`'s filesystem: a store that takes hours
    to encode is not found too big at its end (a quota the filesystem does not report still fails as it comes)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"{what} needs {human_bytes(needed)} in {folder}, which has {human_bytes(free)} free{hint}")


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], limit: int = 4) -> str:
    """`name: <theirs> there, <mine> now` for each name whose values differ, sorted (the first `limit`, then ' ...');
    "" when none do. The wording of every refusal of another run's outputs (checkpoints, images, captions)."""
    absent = _Absent()
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k, absent) != theirs.get(k, absent))
    return ", ".join(f"{k}: {theirs.get(k, absent)!r} there, {mine.get(k, absent)!r} now"
                     for k in keys[:limit]) + (" ..." if len(keys) > limit else "")


class _Absent:
    """An option one side does not have (another version's), shown as such rather than as None."""

    def __repr__(self) -> str:
        return "(absent)"


def read_saved_options(path: str | os.PathLike) -> dict | None:
    """The options a job saved (its `*_config.json`), or None where there is none to read (an older version's folder)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def check_same_settings(folder: str | os.PathLike, config: str, now: Mapping[str, Any],
                        settings: Callable[[Mapping[str, Any]], dict], what: str) -> dict | None:
    """Refuse, in one line, to add to `folder` when the options saved in its `config` file made its outputs (`what`:
    images, captions) under other settings than `now`. `settings(options)` is the part of a job's options that
    determines its outputs (not how it runs, nor which samples it covers). Returns the saved options; None (and
    nothing refused) where there is no readable config."""
    saved = read_saved_options(Path(folder) / config)
    if saved is not None:
        mine, theirs = (json.loads(json.dumps(settings(o), sort_keys=True, default=str)) for o in (now, saved))  # tuples: lists
        refuse_other_settings(folder, what, differences(mine, theirs))
    return saved


def refuse_other_settings(folder: str | os.PathLike, what: str, difference: str) -> None:
    """The one-line refusal of a resume into a folder of other settings (`difference` as `differences` words it)."""
    if difference:
        raise UserError(f"{folder} holds {what} of other settings ({difference}): use another --output_dir or remove it")
