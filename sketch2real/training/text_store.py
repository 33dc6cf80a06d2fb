"""Text conditionings of a run's prompts on disk, where the text encoders are frozen: a style run with a caption per
image (75,471 at full Sketchy) encodes each distinct prompt once, all ranks together, and then trains without the
encoders (FLUX.1's T5-XXL alone is 9.5 GB in bf16).

The distinct prompts are cut into blocks of `BLOCK`; each block is one `.npy` file per conditioning tensor (states,
and where the family has them the pooled embedding and time ids), written atomically by whichever rank encoded it and
read back memory-mapped (host memory of a batch). Values are stored bit for bit in the encoders' dtype (bf16 as its
16-bit pattern): training from the store is training from the encoders. The folder is named by the model, the
encoders' dtype, the resolution and the prompts, so a requeued job or a later run on the same captions finds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sketch2real.device import to_device
from sketch2real.family import Conditioning
from sketch2real.io import atomic_path, check_room, human_bytes, write_json
from sketch2real.training.accelerator import main_process_view
from sketch2real.training.latent_store import MappedFiles, deal_missing_blocks
from sketch2real.training.preemption import preemption

logger = logging.getLogger("sketch2real")

BLOCK = 256  # prompts per file
ENCODE_BATCH = 32  # prompts per encoder call: the same calls on any number of processes
_AS_BITS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks, stored as their bit patterns


class TextStore:
    """The conditioning of each of `prompts` (distinct, in a fixed order), in block files under `root/<key>/`."""

    def __init__(self, root: str | Path, prompts: list[str], identity: str):
        self.prompts = sorted(set(prompts))
        self.row = {p: i for i, p in enumerate(self.prompts)}
        digest = hashlib.sha256(identity.encode())
        for prompt in self.prompts:
            digest.update(prompt.encode() + b"\0")
        self.folder = Path(root) / f"text-{digest.hexdigest()[:24]}"
        self.fields: int | None = None
        self.dtype: torch.dtype | None = None
        self._blocks = MappedFiles()
        self.stats = {"folder": str(self.folder), "prompts": len(self.prompts), "blocks_encoded_here": 0,
                      "blocks_reused": 0}

    def _file(self, block: int, field: int) -> Path:
        return self.folder / f"block-{block:06d}.{field}.npy"

    def _blocks_total(self) -> int:
        return -(-len(self.prompts) // BLOCK)

    def _complete(self, block: int) -> bool:
        """Whether `block` is on disk whole: its marker, and a file per field holding a row per prompt in the marker's
        dtype (a damaged or foreign block is encoded again, not read as conditioning)."""
        marker = self.folder / f"block-{block:06d}.done"
        if not marker.is_file():
            return False
        rows = len(self.prompts[block * BLOCK : (block + 1) * BLOCK])
        try:
            meta = json.loads(marker.read_text())
            dtype = getattr(torch, meta["dtype"])
            stored = np.dtype(str(_AS_BITS.get(dtype, dtype)).removeprefix("torch."))
            for field in range(meta["fields"]):
                values = np.load(self._file(block, field), mmap_mode="r")  # the header only; no pickles
                if values.shape[:1] != (rows,) or values.dtype != stored:
                    raise ValueError(f"field {field}: {values.shape} {values.dtype}, expected {rows} rows of {stored}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as err:
            logger.warning("text store %s: block %d is damaged (%s); encoding it again", self.folder, block, err)
            return False
        return True

    @torch.no_grad()
    def build(self, accelerator, encode: Callable[[list[str]], Conditioning]) -> None:
        """Encode the missing blocks, dealt round-robin to the ranks (rank 0 lists what is missing for all). A
        collective: every rank calls it; every block is there when it returns."""
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
        missing, mine = deal_missing_blocks(accelerator, list(range(self._blocks_total())), self._complete)
        if missing:  # its size first: at 512 T5 tokens a caption's states are 4 MiB, 75k captions 300 GiB
            per_prompt = sum(t[0].numel() * t.element_size() for t in encode(self.prompts[:1]).as_tuple())
            needed = per_prompt * sum(len(self.prompts[b * BLOCK : (b + 1) * BLOCK]) for b in missing)
            logger.info("text store %s: %d prompts to encode, %s (%s each)", self.folder,
                        needed // per_prompt, human_bytes(needed), human_bytes(per_prompt))
            main_process_view(accelerator, lambda: check_room(
                self.folder, needed, f"the text store of {len(self.prompts)} prompts ({human_bytes(per_prompt)} each)",
                ": give --latent_cache_dir on a disk with room, or fewer prompt tokens (--max_sequence_length, where "
                "the family has T5 or Qwen)"))
        for block in mine:
            preemption.check()  # finished blocks stay: a requeued job encodes only the rest
            prompts = self.prompts[block * BLOCK : (block + 1) * BLOCK]
            parts = [encode(prompts[i : i + ENCODE_BATCH]).as_tuple() for i in range(0, len(prompts), ENCODE_BATCH)]
            for field, tensors in enumerate(zip(*parts)):
                values = torch.cat(tensors).cpu()
                bits = values.view(_AS_BITS[values.dtype]) if values.dtype in _AS_BITS else values
                with atomic_path(self._file(block, field)) as tmp, open(tmp, "wb") as f:
                    np.save(f, bits.numpy())
            meta = {"fields": len(parts[0]), "dtype": str(parts[0][0].dtype).removeprefix("torch.")}
            with atomic_path(self.folder / f"block-{block:06d}.done") as tmp:  # last: the block is complete
                Path(tmp).write_text(json.dumps(meta))
            self.stats["blocks_encoded_here"] += 1
        accelerator.wait_for_everyone()
        self.stats["blocks_reused"] = self._blocks_total() - len(missing)
        meta = json.loads((self.folder / "block-000000.done").read_text()) if self.prompts else {"fields": 0}
        self.fields, self.dtype = meta["fields"], getattr(torch, meta.get("dtype", "float32"))
        if accelerator.is_main_process:
            write_json(self.folder / "store.json", {"prompts": len(self.prompts), "block": BLOCK, **meta})
        logger.info("text store %s: %d prompts, %d blocks encoded (%d here), %d reused", self.folder, len(self.prompts),
                    len(missing), self.stats["blocks_encoded_here"], self.stats["blocks_reused"])

    def _block(self, block: int, field: int) -> np.ndarray:
        return self._blocks((block, field), self._file(block, field))

    def __call__(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The stored conditioning of a batch's prompts (each one of the store's), on `device`."""
        rows = [self.row[p] for p in prompts]
        tensors = []
        for field in range(self.fields or 0):
            values = torch.from_numpy(np.stack([self._block(r // BLOCK, field)[r % BLOCK] for r in rows]))
            tensors.append(to_device(values.view(self.dtype) if self.dtype in _AS_BITS else values, device))
        return Conditioning.from_tuple(tuple(tensors))
