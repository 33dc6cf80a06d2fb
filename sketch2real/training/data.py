"""Deterministic global batches: the same samples for a step whatever the number of processes."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from sketch2real.cli import UserError
from sketch2real.shards import (
    DECODER_VERSION,
    CorruptSample,
    ShardSamples,
    corrupt_samples,
    image_files,
    load_index,
    open_image,
    read_or_substitute,
)
from sketch2real.training.diffusion import derive_seed


@dataclass
class GlobalBatchSampler:
    """Index sampler over `size` items: step -> global batch -> this rank's rows.

    Epoch e is a permutation seeded by (seed, e); global batches are consecutive
    windows of the epoch sequence. Because the indices depend only on the step,
    a resumed run continues the exact data order with no sampler state to save.
    """

    size: int
    per_device_batch: int
    world_size: int
    rank: int
    accumulation: int
    seed: int
    stream: str = "data"
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, epoch))
        return torch.randperm(self.size, generator=generator)

    def _order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s permutation as a list, drawn once, not every step (the last two are kept: a global batch
        usually spans at most two epochs)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = self._permutation(epoch).tolist()
        return self._orders[epoch]

    def global_indices(self, step: int, micro: int) -> list[int]:
        start = (step * self.accumulation + micro) * self.global_batch
        return [self._order(epoch)[offset] for epoch, offset in
                (divmod(position, self.size) for position in range(start, start + self.global_batch))]

    @property
    def rows(self) -> slice:
        return slice(self.rank * self.per_device_batch, (self.rank + 1) * self.per_device_batch)

    def rank_indices(self, step: int, micro: int) -> list[int]:
        return self.global_indices(step, micro)[self.rows]

    def rank_indices_between(self, first: int, end: int) -> list[int]:
        """Sorted distinct indices this rank reads in global batches first..end-1 (batch k = step * accumulation + micro)."""
        return self._indices_between(first, end, self.rows.start, self.per_device_batch)

    def global_indices_between(self, first: int, end: int) -> list[int]:
        """Sorted distinct indices any rank reads in global batches first..end-1."""
        return self._indices_between(first, end, 0, self.global_batch)

    def _indices_between(self, first: int, end: int, row: int, rows: int) -> list[int]:
        positions = (torch.arange(first, end)[:, None] * self.global_batch + row + torch.arange(rows)).flatten()
        epochs = positions // self.size
        seen: set[int] = set()
        for epoch in epochs.unique().tolist():
            seen.update(self._permutation(epoch)[positions[epochs == epoch] % self.size].tolist())
            if len(seen) == self.size:
                break
        return sorted(seen)


def default_num_workers(local_processes: int) -> int:
    """DataLoader workers per training process: up to 4 of the CPU cores left after one per process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus // max(local_processes, 1) - 1))


class _Rows(torch.utils.data.Dataset):
    """Item k: (k, source[indices_of(k)], the corrupt samples met), decoded in whichever process reads it."""

    def __init__(self, source, indices_of):
        self.source, self.indices_of = source, indices_of

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, dict[str, str]]:
        return k, self.source[self.indices_of(k)], corrupt_samples.drain()


def prefetched(source, keys: list[int], indices_of, num_workers: int, pin_memory: bool):
    """Yield (key, source[indices_of(key)]) for `keys` in order, decoded ahead in `num_workers` DataLoader workers.

    Decoding is deterministic, so what is yielded does not depend on the number of workers; the corrupt samples
    the workers met join this process's `corrupt_samples`. In-memory tensors are indexed in this process.
    """
    if isinstance(source, torch.Tensor):
        num_workers = 0
    loader = torch.utils.data.DataLoader(_Rows(source, indices_of), batch_size=None, sampler=keys, num_workers=num_workers,
                                         pin_memory=pin_memory, prefetch_factor=4 if num_workers else None)
    for key, images, corrupt in loader:
        corrupt_samples.merge(corrupt)
        yield key, images


class StepLoader:
    """This rank's rows of each global batch of a sampler, decoded ahead of the step by DataLoader workers.

    Batch k (= step * accumulation + micro) is exactly `source[sampler.rank_indices(step, micro)]`, so exact
    resume and world-size-independent batches are unchanged. Batches are read in order from the first one
    asked for (where a resumed run starts); asking out of order restarts the workers there.
    """

    def __init__(self, source, sampler: GlobalBatchSampler, max_train_steps: int, num_workers: int, pin_memory: bool):
        self.source, self.sampler, self.num_workers, self.pin_memory = source, sampler, num_workers, pin_memory
        self.end = max_train_steps * sampler.accumulation
        self._batches, self._next = None, -1
        self.wait_seconds = 0.0  # time the training process spent waiting for (or decoding) batches

    def _indices(self, k: int) -> list[int]:
        return self.sampler.rank_indices(*divmod(k, self.sampler.accumulation))

    def batch(self, step: int, micro: int) -> torch.Tensor:
        k = step * self.sampler.accumulation + micro
        start = time.perf_counter()
        if k != self._next or k >= self.end:
            self.close()
            self._batches = prefetched(self.source, list(range(k, max(self.end, k + 1))), self._indices,
                                       self.num_workers, self.pin_memory)
        key, images = next(self._batches)
        self.wait_seconds += time.perf_counter() - start
        assert key == k, (key, k)
        self._next = k + 1
        return images

    def close(self) -> None:
        """Stop the workers (also when garbage-collected)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None


class LazyImages:
    """Images of a split decoded on demand by index (`images[[3, 7]]`, `images[0:8]`), for large training sets.

    Item k is sample `positions[k]`, or where it is corrupt the next readable one (`read_or_substitute`).
    """

    def __init__(self, samples, field: str, positions: list[int]):
        self.samples, self.field, self.positions = samples, field, positions

    def __len__(self) -> int:
        return len(self.positions)

    def identity(self) -> str:
        """What the items are (shards by the fingerprints their index gives, keys in order, field, resolution, decoder): a
        cache's key."""
        samples = self.samples
        shards = sorted({samples.refs[p].shard for p in self.positions})
        missing = [name for name in shards if not (samples.shard_dir / name).is_file()]
        if missing:
            raise UserError(f"{samples.shard_dir / missing[0]} is in the shard index but not on disk ({len(missing)} "
                            "such): run data_prep/make_shards.py again")
        # each shard by what its index says it holds: a copy elsewhere (a node's local disk), touched or copied again
        # is the same store (by path and mtime each requeue encoded it all again, and ranks with their own copies
        # wrote and looked for blocks in different folders)
        held = {entry["name"]: entry.get("fingerprint") for entry in load_index(samples.shard_dir, samples.split)["shards"]}
        stats = [f"{name}:{held.get(name) or (samples.shard_dir / name).stat().st_mtime_ns}" for name in shards]
        keys = hashlib.sha256("\n".join(samples.where(p) for p in self.positions).encode()).hexdigest()
        return (f"{self.field}|{','.join(samples.fields)}|{samples.resolution}|{keys}|{DECODER_VERSION}|"
                + ",".join(stats))

    def where(self, k: int) -> str:
        """`shard:key` of item k (for messages)."""
        return self.samples.where(self.positions[k])

    def content_keys(self) -> list[str]:
        """A name per item for the image it holds (its own, before any substitution): items of one name hold one
        image. The photo of a sketch/photo pair is named by its photo and its bytes' length (the copies a photo's ~6
        pairs carry are one file; a copy that differs is its own image); every other image by its sample."""
        from sketch2real.sketchy import photo_key

        refs, samples = self.samples.refs, self.samples
        if self.field == "photo" and len(samples.fields) > 1:
            return [f"photo:{photo_key(refs[p].key)}:{samples.member_size(p, 'photo')}" for p in self.positions]
        return [f"{self.field}:{samples.where(p)}" for p in self.positions]

    def stands_for(self, k: int) -> int:
        """The item whose sample item k reads: k, or where its sample is corrupt (any image of it) the next
        readable one, as `self[k]` substitutes."""
        offset = [0]

        def read(p: int) -> int:  # counts the positions tried: the item is k plus the substitutions skipped
            offset[0] += 1
            self.samples.read(p)
            return p

        read_or_substitute(read, self.positions, k)
        return (k + offset[0] - 1) % len(self.positions)

    def read_alone(self, candidates: list[int]) -> torch.Tensor | None:
        """The first of the `candidates` (items holding one image) whose image decodes, read without its sample's
        other images; None if none does."""
        for k in candidates:
            try:
                return self.samples.read_field(self.positions[k], self.field)
            except CorruptSample:
                continue
        return None

    def _one(self, k: int) -> torch.Tensor:
        return read_or_substitute(lambda p: self.samples.read(p, (self.field,))[self.field], self.positions, k)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = list(range(len(self)))[index]
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        if isinstance(index, int):
            return self._one(index)
        return torch.stack([self._one(k) for k in index])


def load_shard_images(shard_dir: str, split: str, category: str | list[str] | None, field: str, resolution: int,
                      num_images: int = 0, seed: int = 0, in_memory: bool = True) -> tuple[torch.Tensor | LazyImages, list[dict]]:
    """(A seeded choice of `num_images` of) a split's images of some categories, and their metadata.

    Photos are each taken once (a photo is in each of its sketches' pairs). Returns images [N, 3, R, R] in [-1, 1]
    (a tensor, or a `LazyImages` decoding on demand when `in_memory` is False) and rows with each image's key and
    category. Instance sets are small, so holding them makes every step's batch an index
    lookup: exact resume and world-size-independent batches for free. A corrupt image
    is replaced by the next readable one of the set (`read_or_substitute`).
    """
    categories = [category] if isinstance(category, str) else (category or None)
    samples = ShardSamples(shard_dir, split, fields=(field,), resolution=resolution, categories=categories)
    if len(samples) == 0:
        raise UserError(f"no {field} images for category {category!r} in split {split!r} of {shard_dir}")
    chosen = list(range(len(samples)))
    if field == "photo":  # each of a photo's ~6 pairs carries it: each photo once (its first pair), not per sketch
        from sketch2real.sketchy import photo_key

        chosen = sorted({photo_key(samples.refs[i].key): i for i in reversed(chosen)}.values())
    if num_images and num_images < len(chosen):
        generator = torch.Generator().manual_seed(derive_seed(seed, "instances", category))
        chosen = sorted(chosen[j] for j in torch.randperm(len(chosen), generator=generator)[:num_images].tolist())
    metas = [{"key": samples.refs[i].key, "category": samples.refs[i].category} for i in chosen]
    images = LazyImages(samples, field, chosen)
    return (images[:] if in_memory else images), metas


class FolderImages(NamedTuple):
    """A folder's images as trained on, and where each came from (`crop_geometry`'s rows)."""

    pixels: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    geometry: torch.Tensor  # [N, 6]


def crop_geometry(height: int, width: int, resolution: int) -> tuple[int, int, int, int, int, int]:
    """(original height, width, crop top, left, target height, width) of an image resized, shorter side to
    `resolution`, then center-cropped to a square: SDXL's micro-conditioning, computed as diffusers' SDXL scripts do
    (torchvision's `Resize` then a center crop, the offsets in the resized image)."""
    short, long = min(height, width), max(height, width)
    long = int(resolution * long / short)  # torchvision's rounding
    resized = (resolution, long) if height <= width else (long, resolution)
    top, left = (max(0, int(round((side - resolution) / 2.0))) for side in resized)
    return height, width, top, left, resolution, resolution


def load_folder_images(folder: str, resolution: int, num_images: int = 0) -> FolderImages:
    """The first `num_images` (default all) readable images in `folder` (sorted by name), resized and
    center-cropped, with each one's `crop_geometry`.

    A corrupt file is left out, warned about and counted in `corrupt_samples` (the set is held in memory: nothing
    needs a stand-in to stay aligned, and a stand-in would weight its neighbour twice).
    """
    from PIL import Image, ImageOps

    files = image_files(folder)
    images, geometry = [], []
    for file in files:
        try:
            image = open_image(file)
        except CorruptSample as err:
            corrupt_samples.record(err, "left out")
            continue
        geometry.append(crop_geometry(image.height, image.width, resolution))
        image = ImageOps.fit(image, (resolution, resolution), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        images.append(torch.from_numpy(array).permute(2, 0, 1))
        if len(images) == num_images:
            break
    if not images:
        raise UserError(f"none of the {len(files)} images in {folder} can be read (see the warnings above)")
    return FolderImages(torch.stack(images), torch.tensor(geometry, dtype=torch.float32))
