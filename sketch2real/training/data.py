"""Deterministic global batches: the same samples for a step whatever the number of processes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, epoch))
        return torch.randperm(self.size, generator=generator)

    def global_indices(self, step: int, micro: int) -> list[int]:
        start = (step * self.accumulation + micro) * self.global_batch
        indices, cache = [], {}
        for position in range(start, start + self.global_batch):
            epoch, offset = divmod(position, self.size)
            if epoch not in cache:
                cache[epoch] = self._permutation(epoch)
            indices.append(int(cache[epoch][offset]))
        return indices

    @property
    def rows(self) -> slice:
        return slice(self.rank * self.per_device_batch, (self.rank + 1) * self.per_device_batch)

    def rank_indices(self, step: int, micro: int) -> list[int]:
        return self.global_indices(step, micro)[self.rows]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class LazyImages:
    """Images of a split decoded on demand by index (`images[[3, 7]]`, `images[0:8]`), for large training sets."""

    def __init__(self, samples, field: str, positions: list[int]):
        self.samples, self.field, self.positions = samples, field, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = list(range(len(self)))[index]
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        if isinstance(index, int):
            return self.samples[self.positions[index]][self.field]
        return torch.stack([self.samples[self.positions[i]][self.field] for i in index])


def load_shard_images(shard_dir: str, split: str, category: str | list[str] | None, field: str, resolution: int,
                      num_images: int = 0, seed: int = 0, in_memory: bool = True) -> tuple[torch.Tensor | LazyImages, list[dict]]:
    """(A seeded choice of `num_images` of) a split's images of some categories, and their metadata.

    Returns images [N, 3, R, R] in [-1, 1] (a tensor, or a `LazyImages` decoding on
    demand when `in_memory` is False) and rows with each image's key and category.
    Instance sets are small, so holding them makes every step's batch an index
    lookup: exact resume and world-size-independent batches for free.
    """
    from sketch2real.cli import UserError
    from sketch2real.shards import ShardSamples

    categories = [category] if isinstance(category, str) else (category or None)
    samples = ShardSamples(shard_dir, split, fields=(field,), resolution=resolution, categories=categories)
    if len(samples) == 0:
        raise UserError(f"no {field} images for category {category!r} in split {split!r} of {shard_dir}")
    chosen = list(range(len(samples)))
    if num_images and num_images < len(chosen):
        generator = torch.Generator().manual_seed(derive_seed(seed, "instances", category))
        chosen = sorted(torch.randperm(len(chosen), generator=generator)[:num_images].tolist())
    metas = [{"key": samples.refs[i].key, "category": samples.refs[i].category} for i in chosen]
    if not in_memory:
        return LazyImages(samples, field, chosen), metas
    return torch.stack([samples[i][field] for i in chosen]), metas


def load_folder_images(folder: str, resolution: int, num_images: int = 0) -> torch.Tensor:
    """Every image in `folder` (sorted by name), resized and center-cropped, as [N, 3, R, R] in [-1, 1]."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageOps

    from sketch2real.cli import UserError

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if num_images:
        files = files[:num_images]
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    tensors = []
    for file in files:
        image = ImageOps.fit(Image.open(file).convert("RGB"), (resolution, resolution), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(tensors)
