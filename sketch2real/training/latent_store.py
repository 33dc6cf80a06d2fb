"""VAE posteriors of a whole training set on disk: encoded once, by all ranks together, shared and reused.

Each distinct image is stored once (ControlNet's pairs: each photo, not each of its ~6 pairs). The images are cut
into blocks of `BLOCK`; each block is one `.npy` file of (mean, std) in float16, written
atomically by whichever rank encoded it, and read back memory-mapped, so a rank holds O(batch) of it in memory,
not O(dataset). The folder is named by a fingerprint of the VAE (config and weights), the resolution and the images:
a later run on the same data and VAE (or a requeued one, or another trainer) finds the blocks already there. A
preemption signal stops encoding between chunks; finished blocks stay. Images are encoded in chunks of `CHUNK`
whatever rank does it, so a posterior never depends on the number of processes: exact resume and 1-vs-N equality
hold as with the in-memory cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sketch2real.cli import UserError
from sketch2real.io import atomic_path, check_room, write_json
from sketch2real.training.accelerator import main_process_view
from sketch2real.training.data import LazyImages, prefetched
from sketch2real.training.diffusion import scaled_latents, vae_scale_factor
from sketch2real.training.preemption import preemption

logger = logging.getLogger("sketch2real")

CHUNK = 8  # images per VAE call: the same chunks on any number of processes
BLOCK = 64  # images per file
STORE_DTYPE = np.float16  # half the bytes of fp32; cached training agrees with uncached (tests/test_dreambooth.py)


class Posterior(NamedTuple):
    """A chunk's VAE posterior: its mean and standard deviation (as diffusers' latent_dist names them)."""

    mean: torch.Tensor
    std: torch.Tensor


def encode_posterior(vae, images: torch.Tensor, device: torch.device) -> Posterior:
    """The VAE posterior of a chunk of images, encoded `CHUNK` 16-bit images at a time: a VAE kept in fp32 (fp16 mixed
    precision: SD's VAE overflows in fp16) holds twice the activations per image, so it encodes half as many at once
    (a chunk in one call made the cache build fp16's peak: 8.0 GiB against bf16's 4.8 for an SD 1.5 LoRA at 512 px)."""
    step = max(1, CHUNK * 2 // vae.dtype.itemsize)
    parts = [vae.encode(part.to(device, vae.dtype, non_blocking=True)).latent_dist for part in images.split(step)]
    return Posterior(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


def check_finite_posterior(dist, positions: list[int], images, names: list[str] | None = None) -> None:
    """One line naming the first image whose VAE posterior is not finite (an fp16 overflow, or a broken VAE):
    caught before it enters a cache, where the NaN guard would meet it again after every resume."""
    bad = ~(torch.isfinite(dist.mean).flatten(1).all(1) & torch.isfinite(dist.std).flatten(1).all(1))
    if bad.any():
        k = positions[int(bad.nonzero()[0])]
        name = images.where(k) if isinstance(images, LazyImages) else (names[k] if names else f"image {k} of the set")
        raise UserError(f"the VAE gives a non-finite latent for {name} (VAE dtype {dist.mean.dtype}): a VAE that "
                        "overflows in fp16 needs fp32 or bf16 (or an fp16-safe VAE via --pretrained_vae_model_name_or_path)")


def vae_fingerprint(vae) -> str:
    """Config and a checksum of every weight of the VAE: another VAE (or another VAE dtype) gets another store."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    digest.update(str(vae.dtype).encode())
    with torch.no_grad():
        state = vae.state_dict()
        sums = torch.stack([param.double().abs().sum() for param in state.values()]).tolist()  # one read, not one a weight
        for (name, param), total in zip(state.items(), sums):
            digest.update(f"{name}:{tuple(param.shape)}:{total:.17g}".encode())
    return digest.hexdigest()[:16]


class _SlotImages:
    """Slot s of a store with shared images: the image its items hold, read alone (a blank where none decodes:
    such a slot is never read, its items all being corrupt pairs that stand for others)."""

    def __init__(self, images: LazyImages, members: list[list[int]]):
        self.images, self.members = images, members

    def __getitem__(self, slots: list[int]) -> torch.Tensor:
        side = self.images.samples.resolution
        rows = [self.images.read_alone(self.members[s]) for s in slots]
        return torch.stack([r if r is not None else torch.zeros(3, side, side) for r in rows])


class _StandsFor:
    """Items -> the items they stand for (`LazyImages.stands_for`), found where it is read (DataLoader workers)."""

    def __init__(self, images: LazyImages):
        self.images = images

    def __getitem__(self, items: list[int]) -> torch.Tensor:
        return torch.tensor([self.images.stands_for(k) for k in items])


class MappedFiles:
    """Memory-mapped `.npy` block files, at most `limit` open at once (the least recently read closed first). Each
    open map holds a file descriptor: a style over all of Sketchy reads ~850 latent blocks and ~200 caption blocks,
    past the usual limit of 1,024 ("Too many open files" dozens of steps into the run)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit, self.open = limit, OrderedDict()

    def __call__(self, key: Hashable, path: Path) -> np.ndarray:
        array = self.open.pop(key, None)
        if array is None:
            array = np.load(path, mmap_mode="r")
        self.open[key] = array
        if len(self.open) > self.limit:
            self.open.popitem(last=False)  # its map (and descriptor) closes with its last reference
        return array


def deal_missing_blocks(accelerator, blocks: list[int], complete: Callable[[int], bool]) -> tuple[list[int], list[int]]:
    """(the blocks of `blocks` not `complete` on disk, this rank's share of them). Rank 0 looks and tells the others
    (one view of the filesystem for all); the share is round-robin. A collective: every rank calls it."""
    missing = main_process_view(accelerator, lambda: [b for b in blocks if not complete(b)])
    return missing, missing[accelerator.process_index :: accelerator.num_processes]


class LatentStore:
    """(mean, std) of each image of a `LazyImages` set, in block files under `folder/<fingerprint>/`.

    One row per distinct image (a slot): ControlNet's pairs name their photo, shared by its ~6 sketches, so the
    whole of Sketchy is 12,500 photos encoded and stored, not 75,471. Items map to slots through the sample they
    read: a pair with a corrupt image stands for the next readable one whole (sketch and photo), so before encoding
    the ranks find which items do (`_resolve`, reading the samples once); a slot's image is read alone.
    """

    def __init__(self, root: str | Path, vae, images: LazyImages, device: torch.device, block: int = BLOCK):
        assert block % CHUNK == 0, "a block holds whole chunks"
        self.vae, self.images, self.device, self.block = vae, images, device, block
        slot_of: dict[str, int] = {}
        self.members: list[list[int]] = []  # the items holding each slot's image
        own = []
        for k, name in enumerate(images.content_keys()):
            slot = slot_of.setdefault(name, len(slot_of))
            if slot == len(self.members):
                self.members.append([])
            self.members[slot].append(k)
            own.append(slot)
        self.own_slot = np.asarray(own, dtype=np.int64)
        self.shared = len(self.members) < len(images)
        # item -> slot it reads; with shared images known for the items resolved by `build`
        self.item_slot = np.full(len(images), -1, dtype=np.int64) if self.shared else self.own_slot
        self.slot_images = _SlotImages(images, self.members) if self.shared else images
        layout = f"{block}|{CHUNK}|{STORE_DTYPE.__name__}" + ("|shared-images" if self.shared else "")
        key = hashlib.sha256(f"{vae_fingerprint(vae)}|{images.identity()}|{layout}".encode())
        self.folder = Path(root) / key.hexdigest()[:24]
        self._blocks = MappedFiles()
        self.stats = {"folder": str(self.folder), "images": len(images), "unique_images": len(self.members),
                      "blocks_encoded_here": 0, "blocks_reused": 0, "build_seconds": 0.0}

    def _block_file(self, block: int) -> Path:
        return self.folder / f"block-{block:06d}.npy"

    def _positions(self, chunk: int) -> list[int]:
        return list(range(chunk * CHUNK, min((chunk + 1) * CHUNK, len(self.members))))

    def _resolve(self, accelerator, needed: list[int], num_workers: int, pin_memory: bool, progress: bool) -> None:
        """The slot each needed item reads: that of the item it stands for (itself unless its sample is corrupt),
        found by all ranks together, each reading its share of the samples (a collective).

        What was found is kept in the store (`resolved.npy`, the item -> slot map; the folder's key names the shards'
        contents), so a restart (a requeued job) reads only the items no earlier run resolved."""
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        saved = self.folder / "resolved.npy"
        known = main_process_view(accelerator, lambda: self._saved_resolution(saved))  # every rank resolves the same items
        if known is not None:
            self.item_slot = known
        items = sorted(i for i in set(needed) if self.item_slot[i] < 0)
        if not items:
            return
        mine = items[accelerator.process_index :: accelerator.num_processes]
        self._batches = [mine[i : i + CHUNK] for i in range(0, len(mine), CHUNK)]
        found: dict[int, int] = {}
        for batch, stands_for in tqdm(prefetched(_StandsFor(self.images), list(range(len(self._batches))), self._batch,
                                                 num_workers, pin_memory),
                                      total=len(self._batches), desc="checking pairs", unit="chunk", dynamic_ncols=True,
                                      disable=not progress or len(self._batches) < 2):
            preemption.check()
            found.update(zip(self._batches[batch], stands_for.tolist()))
        if accelerator.num_processes > 1:
            found = {k: v for part in gather_object([found]) for k, v in part.items()}
        for k, j in found.items():
            self.item_slot[k] = self.own_slot[j]
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(saved) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, self.item_slot)

    def _saved_resolution(self, path: Path) -> np.ndarray | None:
        """The item -> slot map an earlier run kept, if it is one for this set (else, damaged or not ours: None, and
        the pairs are read again)."""
        if not path.is_file():
            return None
        try:
            known = np.load(path)  # no pickles: allow_pickle stays off
        except (OSError, ValueError, EOFError) as err:
            logger.warning("ignoring %s (%s): the pairs are read again", path, err)
            return None
        if (known.shape != self.item_slot.shape or known.dtype.kind != "i" or known.min(initial=0) < -1
                or known.max(initial=-1) >= len(self.members)):
            logger.warning("ignoring %s: not an item -> slot map of this set; the pairs are read again", path)
            return None
        return known.astype(np.int64)

    def _batch(self, index: int) -> list[int]:
        return self._batches[index]

    @torch.no_grad()
    def build(self, accelerator, needed: list[int], num_workers: int, pin_memory: bool, progress: bool) -> None:
        """Encode the missing blocks holding `needed` (all ranks' item indices), dealt round-robin to the ranks.

        Rank 0 lists what is missing and tells the others (one view of the filesystem for all). A collective:
        every rank calls it; the blocks are all there when it returns.
        """
        from tqdm.auto import tqdm

        start = time.perf_counter()
        if self.shared:
            self._resolve(accelerator, needed, num_workers, pin_memory, progress)
        wanted = sorted({int(self.item_slot[i]) // self.block for i in needed})
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / "store.json", {"images": len(self.images), "unique_images": len(self.members),
                                                    "block": self.block, "chunk": CHUNK, "dtype": STORE_DTYPE.__name__,
                                                    "source": self.images.identity()[:500]})
        missing_blocks, mine = deal_missing_blocks(accelerator, wanted, lambda b: self._block_file(b).is_file())
        # its size first, not at a full disk (a style over Sketchy's sketches at 1024 px: 13 GiB)
        if missing_blocks and self.images.samples.resolution:
            side = self.images.samples.resolution // vae_scale_factor(self.vae)
            per_image = 2 * self.vae.config.latent_channels * side * side * np.dtype(STORE_DTYPE).itemsize  # mean, std
            images = sum(min(self.block, len(self.members) - b * self.block) for b in missing_blocks)
            main_process_view(accelerator, lambda: check_room(self.folder, per_image * images, f"the latent store of "
                                                              f"{images} images", ": give --latent_cache_dir on a disk "
                                                              "with room"))
        slots = len(self.members)
        chunks = [c for b in mine for c in range(b * self.block // CHUNK, math.ceil(min((b + 1) * self.block, slots) / CHUNK))]
        decoded = prefetched(self.slot_images, chunks, self._positions, num_workers, pin_memory)
        parts: dict[int, list[np.ndarray]] = {}
        bar = tqdm(total=len(chunks), desc="caching latents", unit="chunk", disable=not progress or not chunks,
                   dynamic_ncols=True)
        for chunk, images in decoded:
            preemption.check()  # finished blocks stay on disk: a requeued job encodes only the rest
            dist = encode_posterior(self.vae, images, self.device)
            check_finite_posterior(dist, [self.members[s][0] for s in self._positions(chunk)], self.images)
            pair = torch.stack([dist.mean.float(), dist.std.float()], dim=1).cpu().numpy().astype(STORE_DTYPE)
            block = chunk * CHUNK // self.block
            parts.setdefault(block, []).append(pair)
            bar.update()
            if sum(len(p) for p in parts[block]) == min(self.block, slots - block * self.block):
                with atomic_path(self._block_file(block)) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, np.concatenate(parts.pop(block)))
                self.stats["blocks_encoded_here"] += 1
        bar.close()
        accelerator.wait_for_everyone()  # every block exists from here on (--ddp_timeout bounds the wait)
        self.stats["blocks_reused"] = len(wanted) - len(missing_blocks)
        self.stats["build_seconds"] = time.perf_counter() - start
        logger.info("latent cache %s: %d blocks encoded (%d here), %d reused", self.folder, len(missing_blocks),
                    self.stats["blocks_encoded_here"], self.stats["blocks_reused"])

    def _block(self, block: int) -> np.ndarray:
        return self._blocks(block, self._block_file(block))

    def latents(self, indices: list[int], eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents of `indices` (items) for this step's posterior noise `eps` (as `encode_latents` gives)."""
        slots = [int(self.item_slot[i]) for i in indices]
        assert min(slots) >= 0, "items outside the built range: build() covers every item a run reads"
        rows = torch.from_numpy(np.stack([self._block(s // self.block)[s % self.block] for s in slots]))
        # to the device without waiting for it: from page-locked memory, in float16 (half the bytes), widened there
        pinned = self.device.type == "cuda"
        pair = (rows.pin_memory() if pinned else rows).to(self.device, non_blocking=pinned).float()
        return scaled_latents(self.vae, pair[:, 0] + pair[:, 1] * eps.to(self.device))
