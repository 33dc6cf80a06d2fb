"""Webdataset shards of paired sketch/photo/metadata, and the readers every script uses.

Writing: `{split}-NNNNNN.tar` with members `<key>.sketch.png`, `<key>.photo.jpg`,
`<key>.json` (plain webdataset; `webdataset.WebDataset` reads them too), plus
`{split}.json` listing each shard's keys and categories. Shards are planned up
front from the split rows (so parallel writers and re-runs agree), written to a
temp file and renamed, and a finished shard is skipped on re-run. Every image is
decoded on the way in: a sample the readers could not decode is left out of its
shard and listed in the index (`left_out`).

Reading:
- `ShardStream` (iterable): splits one epoch across ranks and dataloader workers
  at sample granularity, so R ranks x W workers see every sample exactly once;
  every rank gets the same number of samples (short ranks are padded with
  samples flagged `pad`), so every rank runs the same number of batches and DDP
  never hangs. A corrupt image or truncated member becomes a `pad`+`corrupt`
  sample with a warning, never a crash.
- `ShardSamples` (map-style): random access by index, for trainers that sample
  exact global batches (needed for exact resume and 1-vs-N-process equality).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from sketch2real.cli import UserError
from sketch2real.io import atomic_path, read_jsonl, write_json

IMAGE_FIELDS = {"sketch": "sketch.png", "photo": "photo.jpg"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".pgm",
                  ".ppm")  # image files in folders (a GIF's first frame)
logger = logging.getLogger("sketch2real")
T = TypeVar("T")


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files of a folder (`IMAGE_SUFFIXES`, any case; hidden files and folders, such as macOS's `._*`
    twins or .ipynb_checkpoints/, aside), sorted by path, with its subfolders' if `recursive` (linked ones too: a
    category linked in from elsewhere was left out without a word); a missing folder or one without images is one
    line, other files are counted in the log."""
    root = Path(folder)
    if not str(folder) or not root.is_dir():
        raise UserError(f"image folder not found: {folder}")
    found, seen = [], set()
    for here, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen or not recursive and Path(here) != root:  # a link back up the tree is walked once
            folders.clear()
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(here) / name for name in names if not name.startswith(".")]
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images in {folder} (files {', '.join(IMAGE_SUFFIXES)})")
    others = sorted({p.suffix.lower() or "(no suffix)" for p in found if p.suffix.lower() not in IMAGE_SUFFIXES})
    if others:
        logger.info("%s: %d file(s) not read as images (%s)", folder, len(found) - len(files), ", ".join(others))
    return files


def shards_data(shard_dir: str, split: str) -> str:
    """The hash of a split's shard index (each shard's key and image fingerprints): what the shards hold, wherever they
    are copied; "" without one."""
    index = Path(shard_dir) / f"{split}.json" if shard_dir else None
    return hashlib.sha256(index.read_bytes()).hexdigest()[:16] if index is not None and index.is_file() else ""


def image_folder_data(folder: str) -> str:
    """The hash of an image folder's images (`image_files`: their names and bytes): what a folder of the user's
    images holds, wherever it is copied; "" without a folder."""
    if not folder or not Path(folder).is_dir():
        return ""
    digest = hashlib.sha256()
    for file in image_files(folder):
        digest.update(f"{file.relative_to(folder)}\0{file.stat().st_size}\0".encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ----------------------------------------------------------------------------- writing


TAR_BLOCK = 512  # the unit of a tar: a header is one block (more for a long or non-ASCII name), content is padded to it
# Members are written with these (webdataset's user and group): an integer mtime needs no PAX header, where the float
# time.time() that webdataset puts by default took two more blocks per member, and shards are the same bytes on rerun.
SHARD_MTIME, SHARD_OWNER = 0, "bigdata"


def _tar_member_bytes(name: str, size: int) -> int:
    """Bytes the member `name` of `size` bytes takes in a shard: its header(s), as tarfile writes them, and padded data."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, SHARD_MTIME, 0o444, SHARD_OWNER, SHARD_OWNER
    return len(info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")) + -(-size // TAR_BLOCK) * TAR_BLOCK


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar file whose members take `member_bytes`: two zero blocks end it, and Python's tarfile pads the
    whole to a multiple of its record size (10,240 bytes)."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _sample_tar_bytes(row: dict, root: Path) -> int:
    """Bytes a row's three members (sketch, photo, metadata) take in a shard."""
    sizes = [size for _, size in _source_files(row, root)] + [len(_metadata_bytes(row))]
    return sum(_tar_member_bytes(f"{row['key']}.{suffix}", size)
               for suffix, size in zip((IMAGE_FIELDS["sketch"], IMAGE_FIELDS["photo"], "json"), sizes))


def plan_shards(rows: Sequence[dict], root: Path, max_samples: int, max_bytes: int) -> list[list[dict]]:
    """Group rows into shards of at most `max_samples` samples and `max_bytes` bytes on disk (tar headers, padding and
    end blocks counted; a sample over the limit alone gets a shard of its own)."""
    if max_samples < 1:
        raise UserError("--max_samples_per_shard must be at least 1")
    shards: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for row in rows:
        row_bytes = _sample_tar_bytes(row, root)
        if current and (len(current) >= max_samples or (max_bytes > 0 and _tar_file_bytes(size + row_bytes) > max_bytes)):
            shards.append(current)
            current, size = [], 0
        current.append(row)
        size += row_bytes
    if current:
        shards.append(current)
    return shards


def _source_files(row: dict, root: Path) -> list[tuple[Path, int]]:
    """A row's sketch and photo in the release, with their sizes."""
    return [(root / row[field], (root / row[field]).stat().st_size) for field in ("sketch_path", "photo_path")]


def _check_sources(rows: Sequence[dict], root: Path, split: str) -> None:
    """One line when files of the split are missing from the release (a partial copy, another release)."""
    missing = [root / row[field] for row in rows for field in ("sketch_path", "photo_path") if not (root / row[field]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} file(s) of split {split} are not in --sketchy_root {root} (first: {missing[0]}): "
                        "is it the whole release these splits came from?")


def _fingerprint(rows: Sequence[dict], root: Path) -> str:
    """Of a shard's rows and of its files' bytes: a shard is written again when a source image changed under its
    name (a fixed or resized copy of the release), and so is every cache keyed on it (FID reference statistics)."""
    digest = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in rows).encode())
    for row in rows:
        for path, _ in _source_files(row, root):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _metadata(row: dict) -> dict:
    return {k: row.get(k) for k in ("key", "category", "photo_id", "sketch_index", "split", "difficulty", "flags")}


def _metadata_bytes(row: dict) -> bytes:
    return json.dumps(_metadata(row), sort_keys=True).encode()


@dataclass(frozen=True)
class WrittenShard:
    """What writing one shard gave: its file name, its size, and the samples left out ({key: why})."""

    name: str
    size: int
    left_out: dict[str, str]


def _write_one_shard(args: tuple[str, str, list[dict]]) -> WrittenShard:
    """Write one shard atomically, leaving out every sample with an image the readers' `decode_image` cannot decode
    (each source file decoded once: a photo's sketches share it). Runs in a worker process; the caller warns (in plan
    order, whatever the number of workers)."""
    import webdataset as wds

    target, root, rows = args
    root_path, name = Path(root), Path(target).name
    left_out: dict[str, str] = {}
    verdicts: dict[str, str] = {}  # source file -> why it cannot be decoded ("" if it can)
    with atomic_path(target) as tmp:
        with wds.TarWriter(str(tmp), mtime=SHARD_MTIME, user=SHARD_OWNER, group=SHARD_OWNER) as sink:
            for row in rows:
                members = {"__key__": row["key"], "json": _metadata_bytes(row)}
                for field, source in (("sketch", row["sketch_path"]), ("photo", row["photo_path"])):
                    members[IMAGE_FIELDS[field]] = data = (root_path / source).read_bytes()
                    if source not in verdicts:
                        try:
                            decode_image(data, None, False, f"{name}:{row['key']}")
                            verdicts[source] = ""
                        except CorruptSample as err:
                            verdicts[source] = f"{field}: {err.reason}"  # as the readers' `_decode_sample` says it
                reasons = [verdicts[row["sketch_path"]], verdicts[row["photo_path"]]]
                if any(reasons):
                    left_out[row["key"]] = next(r for r in reasons if r)
                    continue
                sink.write(members)
        size = tmp.stat().st_size
    return WrittenShard(name, size, left_out)


def _remove_leftover_temps(out: Path, split: str) -> None:
    """Temp files of a killed writer of `split` (its shards, index and done file): never read, but never left."""
    pattern = re.compile(rf"^(\.{re.escape(split)}-\d+\.tar|\.{re.escape(split)}\.json|\.\.{re.escape(split)}\.done\.json)\..*\.tmp$")
    for path in out.iterdir():
        if pattern.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def write_shards(
    splits_dir: str | os.PathLike,
    sketchy_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    max_samples: int = 1000,
    max_bytes: int = 0,
    num_workers: int = 1,
    progress: bool = True,
) -> dict[str, dict]:
    """Write the shards of each split; returns {split: {"shards": n, "written": n, "samples": n, "left_out": n}}.

    `samples` counts what the shards hold; `left_out` the rows whose images could not be decoded (one warning each,
    and listed with why in the index). A shard is skipped on rerun only when its sources' fingerprint and its size on
    disk are what its writer recorded. The split's index is removed before any of its shards is touched and written
    last, so an interrupted run leaves no index naming shards it did not write."""
    from tqdm import tqdm

    splits_dir, root, out = Path(splits_dir), Path(sketchy_root), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split in splits:
        split_file = splits_dir / f"{split}.jsonl"
        if not split_file.is_file():
            raise UserError(f"{split_file} not found: run data_prep/build_splits.py first")
        rows = read_jsonl(split_file)
        _check_sources(rows, root, split)
        plan = plan_shards(rows, root, max_samples, max_bytes)
        done_file = out / f".{split}.done.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        _remove_leftover_temps(out, split)
        names = [shard_name(split, i) for i in range(len(plan))]
        fingerprints = {name: _fingerprint(shard_rows, root) for name, shard_rows in zip(names, plan)}
        jobs = [(str(out / name), str(root), shard_rows) for name, shard_rows in zip(names, plan)
                if not _is_finished(out / name, done.get(name), fingerprints[name])]
        ours = re.compile(rf"^{re.escape(split)}-\d{{6,}}\.tar$")  # not another split's (`train-extra-000000.tar`)
        stale = [p for p in out.iterdir() if ours.match(p.name) and p.name not in fingerprints]
        if jobs or stale:  # from here on the old index would name shards that are not (or no longer) its own
            (out / f"{split}.json").unlink(missing_ok=True)
        for path in stale:  # shards of an older, longer plan would be read as part of this split
            path.unlink()

        parallel = num_workers > 1 and len(jobs) > 1
        with tqdm(total=len(jobs), desc=f"shards {split}", unit="shard", disable=not progress or not jobs) as bar, \
                (ProcessPoolExecutor(num_workers) if parallel else contextlib.nullcontext()) as pool:
            for shard in (pool.map if parallel else map)(_write_one_shard, jobs):  # in plan order either way
                done[shard.name] = {"fingerprint": fingerprints[shard.name], "size": shard.size, "left_out": shard.left_out}
                write_json(done_file, done)
                for key, reason in shard.left_out.items():
                    logger.warning("corrupt sample %s:%s (%s): left out of the shard", shard.name, key, reason)
                bar.update()
        entries, left_out = [], {}
        for name, shard_rows in zip(names, plan):
            dropped = done[name]["left_out"]
            kept = [r for r in shard_rows if r["key"] not in dropped]
            entries.append({"name": name, "count": len(kept), "fingerprint": fingerprints[name],
                            "keys": [r["key"] for r in kept], "categories": [r["category"] for r in kept]})
            left_out.update({key: f"{name}: {reason}" for key, reason in dropped.items()})
        total = sum(e["count"] for e in entries)
        write_json(out / f"{split}.json", {
            "split": split, "total": total, "rows": len(rows), "shards": entries,
            "left_out": {"count": len(left_out), "keys": sorted(left_out), "reasons": dict(sorted(left_out.items()))},
        })
        summary[split] = {"shards": len(plan), "written": len(jobs), "samples": total, "left_out": len(left_out)}
    return summary


def _is_finished(path: Path, record: Any, fingerprint: str) -> bool:
    """Whether the shard at `path` is the one its writer recorded (`record`, from the done file) for `fingerprint`:
    same sources and the size it was written with (a shard cut short or overwritten on disk is written again)."""
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint or not path.is_file():
        return False  # an older done file's bare fingerprint: no size to check, so written again once
    return path.stat().st_size == record.get("size")


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: shard file, position in it, key, category."""

    shard: str
    position: int
    key: str
    category: str


def load_index(shard_dir: str | os.PathLike, split: str, flag: str = "the split name") -> dict:
    """The `{split}.json` index written by `write_shards`; a missing one is one line naming `flag` (the caller's)."""
    path = Path(shard_dir) / f"{split}.json"
    if not path.is_file():
        raise UserError(f"no shard index {path}: run data_prep/make_shards.py first (or check {flag})")
    try:
        index = json.loads(path.read_text())
    except ValueError as err:  # a write cut short (its writer replaces it atomically: not one of ours), or edited
        raise UserError(f"shard index {path} is not JSON ({err}): run data_prep/make_shards.py again") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise UserError(f"{path} is not a shard index of data_prep/make_shards.py (no list of shards): run it again")
    return index


def sample_refs(shard_dir: str | os.PathLike, split: str, categories: Sequence[str] | None = None) -> list[SampleRef]:
    """All samples of a split in shard order, optionally only some categories (unknown ones are an error)."""
    index = load_index(shard_dir, split)
    refs = [
        SampleRef(entry["name"], pos, key, category)
        for entry in index["shards"]
        for pos, (key, category) in enumerate(zip(entry["keys"], entry["categories"]))
    ]
    if categories:
        present = {r.category for r in refs}
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise UserError(f"unknown category {unknown[0]!r} in split {split!r}; it has: {', '.join(sorted(present))}")
        wanted = set(categories)
        refs = [r for r in refs if r.category in wanted]
    return refs


_OBJECT_AT = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL's `<_io.BytesIO object at 0x7f...>`
# 16,000 x 16,000: a 200 MP phone photo (16,320 x 12,240) reads; a decompression bomb (a few KB declaring more) stops
# here, before its pixels are allocated. Pillow's own limit (89 MP warns, 179 MP refuses) would refuse such photos.
MAX_IMAGE_PIXELS = 256_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class CorruptSample(Exception):
    """A sample that cannot be read: an undecodable, empty or oversized image, or a member missing from its shard."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


class CorruptLog:
    """The corrupt samples this process met, warned about once each (one line naming shard and key).

    DataLoader workers hand theirs to the training process with each batch (`drain` there, `merge` here),
    and jobs report `summary()` in their metrics.json as `corrupt_samples`.
    """

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self._new: dict[str, str] = {}

    def record(self, error: CorruptSample, action: str = "skipped") -> None:
        if error.where not in self.entries:
            logger.warning("corrupt sample %s (%s): %s", error.where, error.reason, action)
        self.entries[error.where] = self._new[error.where] = error.reason

    def drain(self) -> dict[str, str]:
        """Entries recorded since the last drain (what a worker passes on)."""
        new, self._new = self._new, {}
        return new

    def merge(self, entries: dict[str, str]) -> None:
        self.entries.update(entries)

    def summary(self, entries: dict[str, str] | None = None) -> dict:
        entries = self.entries if entries is None else entries
        return {"count": len(entries), "keys": sorted(entries)}

    def gathered(self, state) -> dict[str, str]:
        """Every process's entries (a collective: every rank calls it; `state` an Accelerator or PartialState)."""
        if state.num_processes == 1:
            return dict(self.entries)
        from accelerate.utils import gather_object

        entries: dict[str, str] = {}
        for part in gather_object([self.entries]):
            entries.update(part)
        return entries


corrupt_samples = CorruptLog()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (a transparent sketch is black strokes on white, not all black)
    and 16-bit greyscale scaled to 8 bits (PIL's own conversion clips it to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        # a 16-bit mode is 16-bit however dark (a near-black one turned mid-grey); "I" holds either kind of values
        top = 65535.0 if image.mode != "I" or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# What `decode_image`'s pixels are made by, in the keys of caches of them (latents): bumped when its resize, crop or
# colour conversion changes; Pillow's version beside it (its resampling has changed between releases).
DECODER_VERSION = f"2|Pillow {Image.__version__}"


def decode_image(data: bytes, resolution: int | None, as_tensor: bool, where: str = "image", upright: bool = True) -> Any:
    """PNG/JPEG bytes -> RGB PIL image, upright by its EXIF orientation (unless not `upright`: pixels as stored, as
    pytorch-fid and clean-fid read them) and resized to a square `resolution`, or a CHW float tensor in [-1, 1].

    The one decoder of the project: every failure (empty or truncated bytes, an unknown format, more than
    `MAX_IMAGE_PIXELS` pixels) is a `CorruptSample` naming `where`, never a PIL traceback.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the line below decides, in one message
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise CorruptSample(where, f"{image.width}x{image.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
            image.load()
            if upright:  # a phone's photo upright, as diffusers' load_image reads it
                ImageOps.exif_transpose(image, in_place=True)
            image = to_rgb(image)
    except CorruptSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise CorruptSample(where, f"over the limit of {MAX_IMAGE_PIXELS:,} pixels ({err})") from None
    except Exception as err:  # PIL raises many types for bad bytes; any of them means this image is unusable
        text = _OBJECT_AT.sub("", str(err).splitlines()[0]) if str(err) else "undecodable"  # the same words every run
        raise CorruptSample(where, f"{type(err).__name__}: {text}") from None
    if resolution and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    if not as_tensor:
        return image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def open_image(path: str | os.PathLike, resolution: int | None = None, as_tensor: bool = False, upright: bool = True) -> Any:
    """An image file through `decode_image` (a `CorruptSample` naming the file when it cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CorruptSample(str(path), f"{type(err).__name__}: {err.strerror or err}") from None
    return decode_image(data, resolution, as_tensor, str(path), upright)


def _decode_sample(members: dict[str, bytes], fields: Sequence[str], resolution: int | None, as_tensor: bool,
                   where: str) -> dict:
    try:
        meta = json.loads(members["json"])
        sample = {"key": meta["key"], "category": meta["category"], "meta": meta, "pad": False, "corrupt": False}
    except (KeyError, ValueError, TypeError) as err:
        raise CorruptSample(where, f"metadata unreadable ({type(err).__name__}: {err})") from None
    for field in fields:
        if IMAGE_FIELDS[field] not in members:
            raise CorruptSample(where, f"no {IMAGE_FIELDS[field]} member")
        try:
            sample[field] = decode_image(members[IMAGE_FIELDS[field]], resolution, as_tensor, where)
        except CorruptSample as err:
            raise CorruptSample(where, f"{field}: {err.reason}") from None
    return sample


def read_or_substitute(read: Callable[[int], T], positions: Sequence[int], k: int) -> T:
    """`read(positions[k])`, or where that sample is corrupt the next readable one in `positions` (wrapping round).

    The one substitution rule of every trainer: which sample stands in depends only on the run's own ordered
    set, so a batch is still a function of the step (exact resume, the same batches on any number of processes).
    """
    for offset in range(len(positions)):
        try:
            return read(positions[(k + offset) % len(positions)])
        except CorruptSample as err:
            corrupt_samples.record(err, "replaced by the next readable sample")
    raise UserError(f"every one of the {len(positions)} samples is corrupt (see the warnings above)")


def _blank_like(fields: Sequence[str], resolution: int | None, as_tensor: bool) -> dict:
    side = resolution or 256
    blank = torch.zeros(3, side, side) if as_tensor else Image.new("RGB", (side, side))
    return {f: blank for f in fields}


def _iter_shard_members(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {suffix: bytes}) groups from a tar; a truncated tar ends with a ReadError."""
    current_key, members = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            directory, _, base = info.name.rpartition("/")
            stem, _, suffix = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            if key != current_key:
                if current_key is not None:
                    yield current_key, members
                current_key, members = key, {}
            members[suffix] = tar.extractfile(info).read()
    if current_key is not None:
        yield current_key, members


def _balanced_range(n: int, parts: int, index: int) -> tuple[int, int]:
    return index * n // parts, (index + 1) * n // parts


def default_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(torch.utils.data.IterableDataset):
    """One pass over a split's shards, split exactly across ranks and dataloader workers.

    Each yielded sample is a dict: key, category, meta, pad, corrupt, and the
    requested image fields ("sketch", "photo") as tensors in [-1, 1] or PIL images.
    Samples with `pad=True` exist only to even out ranks; skip them in outputs.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        split: str,
        fields: Sequence[str] = ("sketch", "photo"),
        resolution: int | None = None,
        categories: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        shuffle_buffer: int = 256,
        seed: int = 0,
        as_tensor: bool = True,
        keys: Sequence[str] | None = None,
    ):
        unknown = [f for f in fields if f not in IMAGE_FIELDS]
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; choose from {sorted(IMAGE_FIELDS)}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.refs = sample_refs(shard_dir, split, categories)
        if keys is not None:
            wanted = set(keys)
            self.refs = [r for r in self.refs if r.key in wanted]
        default_rank, default_world = default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.fields, self.resolution, self.as_tensor = tuple(fields), resolution, as_tensor
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next pass (shard order and buffer), like DistributedSampler."""
        self.epoch = epoch

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(len(self.refs) / self.world_size) if self.refs else 0

    def __len__(self) -> int:
        return self.samples_per_rank

    def _rank_plan(self) -> list[tuple[SampleRef, bool]]:
        """This rank's (sample, is_pad) list, all ranks equally long."""
        refs = self.refs
        if self.shuffle:
            # Shuffle whole shards, keeping each sample's position: streaming stays sequential per shard.
            order = sorted({r.shard for r in refs})
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            rank_of_shard = {name: i for i, name in enumerate(order)}
            refs = sorted(refs, key=lambda r: (rank_of_shard[r.shard], r.position))
        start, end = _balanced_range(len(refs), self.world_size, self.rank)
        plan = [(r, False) for r in refs[start:end]]
        filler = refs[start] if start < len(refs) else (refs[0] if refs else None)
        while filler is not None and len(plan) < self.samples_per_rank:
            plan.append((filler, True))
        return plan

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        plan = self._rank_plan()
        start, end = _balanced_range(len(plan), num_workers, worker_id)
        stream = self._read(plan[start:end])
        if self.shuffle:
            stream = self._buffer_shuffle(stream, random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker_id}"))
        yield from stream

    def _read(self, plan: list[tuple[SampleRef, bool]]) -> Iterator[dict]:
        wanted: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
        ref_at: dict[tuple[str, int], SampleRef] = {}
        shard_order: list[str] = []
        for ref, is_pad in plan:
            if ref.shard not in wanted:
                shard_order.append(ref.shard)
            wanted[ref.shard][ref.position].append(is_pad)
            ref_at[ref.shard, ref.position] = ref
        for shard in shard_order:
            positions = wanted[shard]
            remaining = sum(len(v) for v in positions.values())
            try:
                for position, (key, members) in enumerate(_iter_shard_members(self.shard_dir / shard)):
                    if position not in positions:
                        continue
                    for is_pad in positions.pop(position):
                        remaining -= 1
                        yield self._make_sample(f"{shard}:{key}", members, is_pad)
                    if remaining == 0:
                        break
            except (tarfile.TarError, OSError, EOFError) as err:
                logger.warning("%s: unreadable tar (%s); its remaining samples are skipped", shard, err)
            else:
                if positions:  # cut exactly between two members: a shorter tar that reads cleanly
                    logger.warning("%s: ends before %d of its indexed samples (cut short?); they are skipped", shard,
                                   len(positions))
            for position, pads in positions.items():  # members never reached (truncated tar)
                where = f"{shard}:{ref_at[shard, position].key}"
                corrupt_samples.record(CorruptSample(where, "missing from a truncated shard"))
                for _ in pads:
                    yield self._corrupt(where)

    def _make_sample(self, where: str, members: dict[str, bytes], is_pad: bool) -> dict:
        try:
            sample = _decode_sample(members, self.fields, self.resolution, self.as_tensor, where)
        except CorruptSample as err:  # a corrupt image must never stop a long job
            corrupt_samples.record(err)
            return self._corrupt(where)
        sample["pad"] = is_pad
        return sample

    def _corrupt(self, where: str) -> dict:
        sample = {"key": where.partition(":")[2], "category": "", "meta": {}, "pad": True, "corrupt": True}
        sample.update(_blank_like(self.fields, self.resolution, self.as_tensor))
        return sample

    def _buffer_shuffle(self, stream: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in stream:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def collate_samples(samples: list[dict]) -> dict:
    """Stack tensors, keep everything else as lists (PIL images, strings, metadata); `corrupt_entries`: the corrupt
    samples recorded since the last batch (in a DataLoader worker: its own record, which `merge` passes on)."""
    batch: dict[str, Any] = {"corrupt_entries": corrupt_samples.drain()}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def stream_loader(stream: ShardStream, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a `ShardStream` with the collate that keeps PIL images and metadata."""
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
    )


FileIdentity = tuple[int, int]  # size, mtime: a shard replaced in place (rebuilt) is another (inodes: unstable on FUSE)


def _file_identity(f) -> FileIdentity:
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


def _member_offsets(path: Path) -> tuple[dict[str, tuple[int, int]], str, FileIdentity | None]:
    """{member name: (data offset, size)} of a tar, read up to where it breaks off; why it did ("" if intact); and the
    identity of the file read (None if it could not be opened)."""
    offsets: dict[str, tuple[int, int]] = {}
    identity = None
    try:
        with open(path, "rb") as f:
            identity = _file_identity(f)
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isfile() and info.offset_data + info.size <= identity[0]:
                        offsets[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as err:
        return offsets, f"{type(err).__name__}: {err}", identity
    return offsets, "", identity


class ShardSamples(torch.utils.data.Dataset):
    """Random access to a split's samples (optionally some categories), decoded by `decode_image`.

    `read(i)` raises `CorruptSample` for a sample that cannot be read (any of its `fields` undecodable, or
    missing from a truncated shard); readers choose what to do with it (trainers: `read_or_substitute`).
    `read(i, only)` decodes just the fields in `only` once the whole sample has been checked in this process:
    two views of one pair (ControlNet's sketch and photo) agree on which samples are corrupt.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        split: str,
        fields: Sequence[str] = ("sketch", "photo"),
        resolution: int | None = None,
        categories: Sequence[str] | None = None,
        as_tensor: bool = True,
    ):
        self.shard_dir, self.split = Path(shard_dir), split
        self.refs = sample_refs(shard_dir, split, categories)
        self.fields, self.resolution, self.as_tensor = tuple(fields), resolution, as_tensor
        self._offsets: dict[str, tuple[dict[str, tuple[int, int]], str]] = {}
        self._checked: dict[int, CorruptSample | None] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def _member(self, shard: str, name: str, where: str) -> bytes:
        if shard not in self._offsets:
            self._offsets[shard] = _member_offsets(self.shard_dir / shard)
        offsets, broken, identity = self._offsets[shard]
        if name not in offsets:
            raise CorruptSample(where, f"{name} missing from the shard ({broken or 'not in the tar'})")
        offset, size = offsets[name]
        try:
            with open(self.shard_dir / shard, "rb") as f:
                if _file_identity(f) != identity:  # touched, copied again, or rebuilt (other samples at these offsets)
                    self._check_unchanged(shard, offsets)
                f.seek(offset)
                data = f.read(size)
        except OSError as err:
            raise CorruptSample(where, f"{type(err).__name__}: {err}") from None
        if len(data) != size:
            raise CorruptSample(where, f"{name} cut short in the shard")
        return data

    def _check_unchanged(self, shard: str, offsets: dict[str, tuple[int, int]]) -> None:
        """A shard file changed since its offsets were read: the same members at the same places (touched, copied
        again) reads on; another layout (make_shards.py rebuilt it under this job: its offsets read other samples'
        bytes, which decoded as other images) is one line."""
        again = _member_offsets(self.shard_dir / shard)
        if again[0] != offsets:
            raise UserError(f"{self.shard_dir / shard} was replaced while this job read it (data_prep/make_shards.py "
                            f"into {self.shard_dir}?): rerun the job on the new shards, or build new shards into "
                            "another folder while jobs read these")
        self._offsets[shard] = again

    def where(self, index: int) -> str:
        ref = self.refs[index]
        return f"{ref.shard}:{ref.key}"

    def read(self, index: int, only: Sequence[str] | None = None) -> dict:
        """Sample `index` with its image fields (all, or `only` once the sample is known to be readable)."""
        if index in self._checked:
            if self._checked[index] is not None:
                raise self._checked[index]
            fields = tuple(only) if only is not None else self.fields
        else:
            fields = self.fields
        ref, where = self.refs[index], self.where(index)
        try:
            members = {"json": self._member(ref.shard, f"{ref.key}.json", where)}
            for field in fields:
                members[IMAGE_FIELDS[field]] = self._member(ref.shard, f"{ref.key}.{IMAGE_FIELDS[field]}", where)
            sample = _decode_sample(members, fields, self.resolution, self.as_tensor, where)
        except CorruptSample as err:
            self._checked[index] = err
            raise
        self._checked[index] = None
        return sample

    def member_size(self, index: int, field: str) -> int:
        """Bytes of sample `index`'s image `field` in its shard (-1 where the shard lost it)."""
        ref = self.refs[index]
        if ref.shard not in self._offsets:
            self._offsets[ref.shard] = _member_offsets(self.shard_dir / ref.shard)
        return self._offsets[ref.shard][0].get(f"{ref.key}.{IMAGE_FIELDS[field]}", (0, -1))[1]

    def read_field(self, index: int, field: str):
        """Field `field` of sample `index` decoded alone: whether the sample's other images are readable is not
        asked (nor recorded); `CorruptSample` only if this one is not."""
        ref, where = self.refs[index], self.where(index)
        members = {"json": self._member(ref.shard, f"{ref.key}.json", where),
                   IMAGE_FIELDS[field]: self._member(ref.shard, f"{ref.key}.{IMAGE_FIELDS[field]}", where)}
        return _decode_sample(members, (field,), self.resolution, self.as_tensor, where)[field]

    def __getitem__(self, index: int) -> dict:
        return self.read(index)
