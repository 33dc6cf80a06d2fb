"""Webdataset shards of paired sketch/photo/metadata, and the readers every script uses.

Writing: `{split}-NNNNNN.tar` with members `<key>.sketch.png`, `<key>.photo.jpg`,
`<key>.json` (plain webdataset; `webdataset.WebDataset` reads them too), plus
`{split}.json` listing each shard's keys and categories. Shards are planned up
front from the split rows (so parallel writers and re-runs agree), written to a
temp file and renamed, and a finished shard is skipped on re-run.

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

import hashlib
import io
import json
import logging
import math
import os
import random
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
from PIL import Image

from sketch2real.cli import UserError
from sketch2real.io import atomic_path, read_jsonl, write_json

IMAGE_FIELDS = {"sketch": "sketch.png", "photo": "photo.jpg"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")  # image files in folders
logger = logging.getLogger("sketch2real")
T = TypeVar("T")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ----------------------------------------------------------------------------- writing


def plan_shards(rows: Sequence[dict], root: Path, max_samples: int, max_bytes: int) -> list[list[dict]]:
    """Group rows into shards of at most `max_samples` samples and (about) `max_bytes` bytes."""
    if max_samples < 1:
        raise UserError("--max_samples_per_shard must be at least 1")
    shards: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for row in rows:
        row_bytes = sum(size for _, size in _source_files(row, root))
        if current and (len(current) >= max_samples or (max_bytes > 0 and size + row_bytes > max_bytes)):
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


def _write_one_shard(args: tuple[str, str, list[dict]]) -> str:
    """Write one shard atomically; returns its file name. Runs in a worker process."""
    import webdataset as wds

    target, root, rows = args
    root_path = Path(root)
    with atomic_path(target) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for row in rows:
                sink.write({
                    "__key__": row["key"],
                    "sketch.png": (root_path / row["sketch_path"]).read_bytes(),
                    "photo.jpg": (root_path / row["photo_path"]).read_bytes(),
                    "json": json.dumps(_metadata(row), sort_keys=True).encode(),
                })
    return Path(target).name


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
    """Write the shards of each split; returns {split: {"shards": n, "written": n, "samples": n}}."""
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
        jobs = []
        entries = []
        for i, shard_rows in enumerate(plan):
            name = shard_name(split, i)
            fingerprint = _fingerprint(shard_rows, root)
            entries.append({
                "name": name, "count": len(shard_rows), "fingerprint": fingerprint,
                "keys": [r["key"] for r in shard_rows], "categories": [r["category"] for r in shard_rows],
            })
            if not ((out / name).is_file() and done.get(name) == fingerprint):
                jobs.append((str(out / name), str(root), shard_rows))
        # Shards of an older, longer plan would be read as part of this split: remove them.
        for stale in out.glob(f"{split}-*.tar"):
            if stale.name not in {e["name"] for e in entries}:
                stale.unlink()
        written = 0
        with tqdm(total=len(jobs), desc=f"shards {split}", unit="shard", disable=not progress or not jobs) as bar:
            if num_workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(num_workers) as pool:
                    results = pool.map(_write_one_shard, jobs)
                    for name in results:
                        done[name] = next(e["fingerprint"] for e in entries if e["name"] == name)
                        write_json(done_file, done)
                        written += 1
                        bar.update()
            else:
                for job in jobs:
                    name = _write_one_shard(job)
                    done[name] = next(e["fingerprint"] for e in entries if e["name"] == name)
                    write_json(done_file, done)
                    written += 1
                    bar.update()
        write_json(out / f"{split}.json", {"split": split, "total": len(rows), "shards": entries})
        summary[split] = {"shards": len(plan), "written": written, "samples": len(rows)}
    return summary


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
    return json.loads(path.read_text())


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


MAX_IMAGE_PIXELS = 40_000_000  # 6,300 x 6,300: far above Sketchy's 256 x 256; a decompression bomb stops here


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
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, resolution: int | None, as_tensor: bool, where: str = "image") -> Any:
    """PNG/JPEG bytes -> RGB PIL image (resized to a square `resolution`) or a CHW float tensor in [-1, 1].

    The one decoder of the project: every failure (empty or truncated bytes, an unknown format, more than
    `MAX_IMAGE_PIXELS` pixels) is a `CorruptSample` naming `where`, never a PIL traceback.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise CorruptSample(where, f"{image.width}x{image.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
            image.load()
            image = to_rgb(image)
    except CorruptSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise CorruptSample(where, f"over the limit of {MAX_IMAGE_PIXELS:,} pixels ({err})") from None
    except Exception as err:  # PIL raises many types for bad bytes; any of them means this image is unusable
        raise CorruptSample(where, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'undecodable'}") from None
    if resolution and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    if not as_tensor:
        return image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def open_image(path: str | os.PathLike, resolution: int | None = None, as_tensor: bool = False) -> Any:
    """An image file through `decode_image` (a `CorruptSample` naming the file when it cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CorruptSample(str(path), f"{type(err).__name__}: {err.strerror or err}") from None
    return decode_image(data, resolution, as_tensor, str(path))


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
        self.shard_dir = Path(shard_dir)
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
    """Stack tensors, keep everything else as lists (PIL images, strings, metadata)."""
    batch: dict[str, Any] = {}
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


def _member_offsets(path: Path) -> tuple[dict[str, tuple[int, int]], str]:
    """{member name: (data offset, size)} of a tar, read up to where it breaks off; and why it did ("" if intact)."""
    offsets: dict[str, tuple[int, int]] = {}
    try:
        size = path.stat().st_size
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if info.isfile() and info.offset_data + info.size <= size:
                    offsets[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as err:
        return offsets, f"{type(err).__name__}: {err}"
    return offsets, ""


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
        self.shard_dir = Path(shard_dir)
        self.refs = sample_refs(shard_dir, split, categories)
        self.fields, self.resolution, self.as_tensor = tuple(fields), resolution, as_tensor
        self._offsets: dict[str, tuple[dict[str, tuple[int, int]], str]] = {}
        self._checked: dict[int, CorruptSample | None] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def _member(self, shard: str, name: str, where: str) -> bytes:
        if shard not in self._offsets:
            self._offsets[shard] = _member_offsets(self.shard_dir / shard)
        offsets, broken = self._offsets[shard]
        if name not in offsets:
            raise CorruptSample(where, f"{name} missing from the shard ({broken or 'not in the tar'})")
        offset, size = offsets[name]
        try:
            with open(self.shard_dir / shard, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as err:
            raise CorruptSample(where, f"{type(err).__name__}: {err}") from None
        if len(data) != size:
            raise CorruptSample(where, f"{name} cut short in the shard")
        return data

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
