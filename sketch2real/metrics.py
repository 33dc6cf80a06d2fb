"""Inception features exactly as pytorch-fid computes them, FID, unbiased KID, per category,
cached reference statistics, pairing scores, and (optionally) CLIP score."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sketch2real.cli import UserError
from sketch2real.io import part_files
from sketch2real.shards import DECODER_VERSION, CorruptSample, ShardSamples, corrupt_samples, image_files, open_image

logger = logging.getLogger("sketch2real")
VALID_DIMS = (64, 192, 768, 2048)
Z95 = 1.96  # the standard normal's 97.5th percentile (normal 95% intervals)


@dataclass
class ImageSet:
    """Images to score: a name, each image's loader spec, id and category (and paired sample key)."""

    name: str
    sources: list  # Path, (shard_dir, split, key, field), or a PIL image
    ids: list[str]
    categories: list[str]
    sample_keys: list[str]
    prompts: list[str] | None = None  # the prompt of each generated image (from index.jsonl)
    path: str = ""  # the resolved folder or shard directory, recorded in metrics.json and report.md

    def __len__(self) -> int:
        return len(self.ids)


# What infer/generate.py writes beside its images/ (sketch2real.generation.CONFIG and the merged index)
GENERATION_FILES = ("generate_config.json", "index.jsonl")


def folder_name(root: Path) -> str:
    """A bare folder's set name: the resolved folder's own name (`.` and `runs/x/` name themselves), or, for
    infer/generate.py's images/ subfolder, its run folder's name (every run's images/ would share one name)."""
    resolved = root.resolve()
    if resolved.name == "images" and any((resolved.parent / f).is_file() for f in GENERATION_FILES):
        return resolved.parent.name
    return resolved.name or str(resolved)


def generation_root(root: Path) -> Path:
    """The folder to read: infer/generate.py's run folder where `root` is it or its images/ (scored from its
    index.jsonl either way: the same pairs, categories and prompts), else `root`. An unfinished run (ranks' rows
    not merged into index.jsonl, or PREEMPTED beside its generate_config.json) is refused in one line: read as a
    plain folder, it scored the images drawn so far, with mosaics/ and `images/<category>` as categories."""
    run = root.resolve().parent if root.resolve().name == "images" else root
    found = [p.name for p in part_files(run, "index")[:1]]
    found += ["PREEMPTED"] if (run / "PREEMPTED").is_file() and (run / "generate_config.json").is_file() else []
    if found:
        raise UserError(f"{run}: an unfinished infer/generate.py run ({' and '.join(found)}, its index not merged "
                        "into index.jsonl): rerun the same infer/generate.py command (it resumes), then score it")
    return run if (run / "index.jsonl").is_file() else root


def folder_set(folder: str, name: str | None = None) -> ImageSet:
    """A folder of images (recursive), named `name` or by `folder_name`. With an index.jsonl (from
    infer/generate.py, also where `folder` is its images/: `generation_root`), categories, pairs and prompts come
    from it."""
    if not folder or not Path(folder).is_dir():
        raise UserError(f"image folder not found: {folder}")
    root = generation_root(Path(folder))
    index = root / "index.jsonl"
    if index.is_file():
        from sketch2real.io import read_jsonl

        rows = sorted(read_jsonl(index), key=lambda r: r["key"])  # one lost on disk is counted unreadable, not dropped
        paths = [root / r["image"] for r in rows]
        categories = [r.get("category", "") for r in rows]
        keys = [r.get("sample_key", "") for r in rows]
        prompts = [r.get("prompt", "") for r in rows]  # "" where none (a captioner's empty caption: unconditional)
    else:
        prompts = None
        paths = image_files(root, recursive=True)
        categories = [str(p.parent.relative_to(root)) if p.parent != root else "" for p in paths]
        keys = [""] * len(paths)
    if not paths:
        raise UserError(f"no images in {folder}")
    return ImageSet(name or folder_name(root), paths, [str(p.relative_to(root)) for p in paths], categories, keys, prompts,
                    str(root.resolve()))


def drawn_samples(reference: ImageSet, count: int, seed: int) -> set[str]:
    """`count` of the reference's sample keys drawn without replacement by `seed` alone (a fixed evaluation sample,
    the same in every job that asks: the study scored 100 sketches)."""
    keys = sorted(set(reference.sample_keys) - {""})
    if not keys:  # a folder of images: no Sketchy samples to draw
        raise UserError(f"--max_samples {count}: the reference's images name no Sketchy samples (a folder: give "
                        "--reference_shards, or leave --max_samples out)")
    if count > len(keys):
        raise UserError(f"--max_samples {count}: the reference has {len(keys)} samples")
    return {keys[i] for i in np.random.default_rng(seed).choice(len(keys), count, replace=False)}


def of_samples(images: ImageSet, keys: set[str]) -> ImageSet:
    """The images of `images` whose sample is one of `keys` (generated images name theirs in index.jsonl)."""
    if not any(images.sample_keys):
        raise UserError(f"{images.name}: its images do not name their samples (no sample_key in index.jsonl), so "
                        "--max_samples cannot choose among them")
    rows = [i for i, key in enumerate(images.sample_keys) if key in keys]
    if not rows:
        raise UserError(f"{images.name}: no image of the {len(keys)} drawn samples")
    found = len(keys & set(images.sample_keys))
    if found < len(keys):  # scored on fewer samples than its neighbours in the table: said, not silent
        logger.warning("%s: images of %d of the %d drawn samples only (the others were not generated): its scores are "
                       "of those %d", images.name, found, len(keys), found)
    return _rows_of(images, rows)


def of_categories(images: ImageSet, categories: Sequence[str]) -> ImageSet:
    """The images of `images` of these categories (generated images name theirs in index.jsonl; a plain folder's
    are its subfolders): a set is scored against a reference cut to the same ones."""
    rows = [i for i, category in enumerate(images.categories) if category in set(categories)]
    if not rows:
        raise UserError(f"{images.name} ({images.path}): no image of --categories {' '.join(categories)} (its categories: "
                        f"{', '.join(sorted(set(images.categories) - {''})) or 'none named'})")
    return _rows_of(images, rows)


def _rows_of(images: ImageSet, rows: list[int]) -> ImageSet:
    pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
    return ImageSet(images.name, pick(images.sources), pick(images.ids), pick(images.categories), pick(images.sample_keys),
                    pick(images.prompts), images.path)


def shard_set(shard_dir: str, split: str, field: str, categories: Sequence[str] | None = None) -> ImageSet:
    """The sketches or photos of a split, read straight from the shards."""
    from sketch2real.shards import sample_refs

    refs = sample_refs(shard_dir, split, categories)
    if not refs:
        raise UserError(f"no samples in split {split!r} of {shard_dir}")
    plural = {"sketch": "sketches"}.get(field, f"{field}s")
    return ImageSet(f"{split} {plural}", [(shard_dir, split, r.key, field) for r in refs], [r.key for r in refs],
                    [r.category for r in refs], [r.key for r in refs], path=str(Path(shard_dir).resolve()))


def fingerprint(images: ImageSet, settings: dict) -> str:
    """A key for cached statistics: the exact image contents (or shard rows), the extraction settings and the decoder
    that turns them into pixels (`DECODER_VERSION`: a 16-bit PNG read as 8-bit, EXIF rotation, a Pillow upgrade)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + DECODER_VERSION.encode())
    shard_prints: dict[tuple[str, str], dict] = {}
    for source, image_id in zip(images.sources, images.ids):
        if isinstance(source, Path):
            digest.update(image_id.encode() + hashlib.sha1(source.read_bytes()).digest())
        else:
            shard_dir, split, key, field = source
            if (shard_dir, split) not in shard_prints:
                index = json.loads((Path(shard_dir) / f"{split}.json").read_text())
                shard_prints[(shard_dir, split)] = {k: e["fingerprint"] for e in index["shards"] for k in e["keys"]}
            digest.update(f"{key}:{field}:{shard_prints[(shard_dir, split)][key]}".encode())
    return digest.hexdigest()[:24]


class _Loader(torch.utils.data.Dataset):
    """pytorch-fid's preprocessing: RGB, ToTensor in [0, 1], no resize (the network resizes to 299)."""

    def __init__(self, sources: list, resize: int | None = None, clean_resize: bool = False):
        self.sources, self.resize, self.clean_resize = sources, resize, clean_resize
        self._samples: dict = {}

    def __len__(self) -> int:
        return len(self.sources)

    def _open(self, source) -> Image.Image:
        """An RGB image through the project's one decoder (`CorruptSample` when unreadable); images in memory as
        they are (validation images during training)."""
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        if isinstance(source, Path):  # pixels as stored, EXIF orientation aside: as pytorch-fid reads a file
            return open_image(source, upright=False)
        shard_dir, split, key, field = source
        if (shard_dir, split, field) not in self._samples:
            samples = ShardSamples(shard_dir, split, fields=(field,), as_tensor=False)
            self._samples[(shard_dir, split, field)] = (samples, {r.key: i for i, r in enumerate(samples.refs)})
        samples, position = self._samples[(shard_dir, split, field)]
        return samples.read(position[key])[field]

    def __getitem__(self, i: int):
        import torchvision.transforms.functional as TF

        try:
            image = self._open(self.sources[i])
        except CorruptSample as err:  # counted and skipped, never fatal
            corrupt_samples.record(err)
            return torch.zeros(3, self.resize or 8, self.resize or 8), False, err.where
        if self.resize and image.size != (self.resize, self.resize):
            image = image.resize((self.resize, self.resize), Image.BICUBIC)
        if self.clean_resize:
            return clean_resize(image, INCEPTION_SIDE), True, ""
        return TF.to_tensor(image), True, ""


INCEPTION_SIDE = 299


def clean_resize(image: Image.Image, side: int) -> torch.Tensor:
    """clean-fid's resize (Parmar et al. 2022): each channel as float32 through PIL's anti-aliased bicubic filter,
    no rounding to uint8; a [0, 1] CHW tensor. (pytorch-fid lets the network resize bilinearly, without
    anti-aliasing, which aliases downscaled images and shifts FID.)"""
    channels = [np.asarray(Image.fromarray(np.asarray(image, dtype=np.float32)[..., c], mode="F").resize(
        (side, side), Image.BICUBIC), dtype=np.float32) for c in range(3)]
    return torch.from_numpy(np.stack(channels) / 255.0).clamp(0, 1)


# The modes that shards.to_rgb composites on white (pytorch-fid's convert('RGB') drops their alpha instead)
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def has_transparency(source) -> bool:
    """Whether an image file has an alpha channel or a transparent palette (from its header, nothing decoded): where
    scores differ from pytorch-fid's, which drops the alpha. Shard rows and unreadable files: False."""
    if not isinstance(source, Path):
        return False
    try:
        with Image.open(source) as image:
            return image.mode in TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info)
    except Exception:  # PIL raises many types for bad files: unreadable ones are counted as corrupt elsewhere
        return False


def open_images(sources: Sequence) -> list[Image.Image]:
    """An ImageSet's sources (files or shard rows) decoded as RGB images."""
    loader = _Loader(list(sources))
    return [loader._open(source) for source in loader.sources]


def thumbnails(sources: Sequence, side: int = 16) -> np.ndarray:
    """Each image as a grey side x side thumbnail (box filter), flattened and centred: a feature space that keeps
    where things are, for pairing scores (pooled network features are nearly translation invariant)."""
    rows = []
    for image in open_images(sources):
        array = np.asarray(image.convert("L").resize((side, side), Image.BOX), dtype=np.float64).ravel()
        rows.append(array - array.mean())
    return np.stack(rows)


@contextmanager
def loader_batches(loader) -> Iterator:
    """A DataLoader's batches whose workers stop when the block ends, an error included: left to the interpreter's
    exit, their termination raises in torch's SIGCHLD handler, a traceback printed after a one-line error."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()  # what the iterator's __del__ would do, now


def _collate(batch):
    sizes = {tuple(t.shape) for t, ok, _ in batch if ok}
    if len(sizes) > 1:
        raise UserError(f"images of different sizes in one set ({sorted(sizes)[:2]}...): pass --resize")
    side = next(iter(sizes)) if sizes else batch[0][0].shape
    tensors = [t if ok else torch.zeros(side) for t, ok, _ in batch]
    return torch.stack(tensors), torch.tensor([ok for _, ok, _ in batch]), [e for _, _, e in batch]


def inception(dims: int, device: torch.device, channels_last: bool = False):
    """pytorch-fid's InceptionV3 (its FID weights from TORCH_HOME), returning the `dims` features.

    `channels_last`: ~1.5x faster convolutions (oneDNN, cuDNN), features equal only to float rounding
    (FID within ~1e-6 relative of pytorch-fid's instead of equal); off by default.
    """
    from pytorch_fid.inception import InceptionV3

    if dims not in VALID_DIMS:
        raise UserError(f"--dims must be one of {VALID_DIMS}, got {dims}")
    try:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).to(device, memory_format=layout).eval()
    except Exception as err:
        raise UserError(f"cannot load pytorch-fid's Inception weights (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}): "
                        f"{str(err).splitlines()[0]}") from err


def rank_range(count: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share of `count` images in whole batches: every batch holds the images one process
    would batch together, so features do not depend on the number of processes (a batch's make-up moves a
    convolution's last bits); a rank may get none."""
    batches = -(-count // batch_size)
    return (min(count, rank * batches // world_size * batch_size),
            min(count, (rank + 1) * batches // world_size * batch_size))


@torch.inference_mode()
def extract_features(images: ImageSet, model, dims: int, device: torch.device, batch_size: int = 50, num_workers: int = 2,
                     rank: int = 0, world_size: int = 1, resize: int | None = None, progress: bool = True,
                     channels_last: bool = False, clean_resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features of this rank's contiguous part of `images` (`rank_range`; float64, as pytorch-fid) and a validity
    mask."""
    from torch.nn.functional import adaptive_avg_pool2d
    from tqdm.auto import tqdm

    start, end = rank_range(len(images), batch_size, rank, world_size)
    loader = torch.utils.data.DataLoader(_Loader(images.sources[start:end], resize, clean_resize), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    features, valid = np.empty((end - start, dims)), np.zeros(end - start, dtype=bool)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    position = 0
    try:
        with loader_batches(loader) as batches:
            for batch, ok, errors in tqdm(batches, desc=f"features {images.name}", unit="batch", disable=not progress):
                prediction = model(batch.to(device, non_blocking=True, memory_format=layout))[0]
                if prediction.size(2) != 1 or prediction.size(3) != 1:
                    prediction = adaptive_avg_pool2d(prediction, output_size=(1, 1))
                n = batch.shape[0]
                features[position : position + n] = prediction.squeeze(3).squeeze(2).cpu().numpy()
                valid[position : position + n] = ok.numpy()
                corrupt_samples.merge({where: "unreadable" for where in errors if where})  # warned in the worker
                position += n
    except UserError as err:
        original = worker_error(err)
        if original is err:
            raise
        raise original from None
    return features, valid


def worker_error(err: UserError) -> UserError:
    """The UserError a DataLoader worker raised (`_collate`'s sizes), as it was: torch re-raises it in the main process
    with the worker's whole traceback for a message ("Caught UserError in DataLoader worker process 0. Original
    Traceback ..."), which is no one-line error; its own message follows the traceback's last "<module>.<class>: "."""
    text, marker = str(err), f"{type(err).__module__}.{type(err).__qualname__}: "
    if "in DataLoader worker process" not in text or marker not in text:
        return err
    return UserError(text.rsplit(marker, 1)[1].strip())


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's Fréchet distance ||mu1 - mu2||² + tr(Σ1 + Σ2 - 2 sqrtm(Σ1 Σ2)), same value, much faster.

    Σ1 Σ2 is similar to the symmetric PSD matrix Σ1^½ Σ2 Σ1^½, so tr(sqrtm(Σ1 Σ2)) is the sum of the square
    roots of that matrix's eigenvalues: two symmetric eigendecompositions instead of scipy's Schur-based
    sqrtm of a non-symmetric 2048² matrix (tens of seconds each on a CPU, once per set and per category).
    """
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = np.atleast_1d(mu1).astype(np.float64) - np.atleast_1d(mu2).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sigma1_sqrt = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sigma1_sqrt @ sigma2 @ sigma1_sqrt), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets: pytorch-fid's value (its statistics and Fréchet distance), computed fast.

    With fewer images than dimensions (the study's 100-125 images at 2048 dims, every per-category score),
    the covariances have rank < n and tr(sqrtm(Σa Σb)) is the nuclear norm of A Bᵀ / sqrt((na-1)(nb-1)) for
    the centred features A, B: the singular values of an na x nb matrix instead of anything 2048².
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*statistics(a), *statistics(b))
    a_centred, b_centred = a - a.mean(0), b - b.mean(0)
    # singular values of the cross matrix itself, not square roots of its Gram matrix's eigenvalues: those carry
    # rounding of order sqrt(eps) x the largest one (FID of a set against itself came out ~3e-7, not 0)
    nuclear_norm = np.linalg.svd(a_centred @ b_centred.T, compute_uv=False).sum()
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (a_centred**2).sum() / (len(a) - 1) + (b_centred**2).sum() / (len(b) - 1)
                 - 2 * nuclear_norm / scale)


KERNEL_BLOCK = 2048  # rows of a kernel block: 2048 x 75k float64 is 1.2 GB, where the whole matrix would be 45 GB


def cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel (x·y/d + 1)³ of every row of `x` with every row of `y`, computed in place: one block in
    memory, not four temporaries."""
    kernel = x @ y.T
    kernel /= x.shape[1]
    kernel += 1
    kernel **= 3
    return kernel


def cubic_kernel_sum(x: np.ndarray, y: np.ndarray, skip_diagonal: bool = False, block: int = KERNEL_BLOCK) -> float:
    """Σ (x·y/d + 1)³ over all pairs of rows (less the diagonal when `x` is `y`), a block of rows at a time:
    memory O(block · len(y)), not O(len(x) · len(y)). One block gives the same sum as the whole matrix."""
    total = 0.0
    for start in range(0, len(x), block):
        kernel = cubic_kernel(x[start : start + block], y)
        total += kernel.sum()
        if skip_diagonal:
            total -= np.trace(kernel[:, start : start + block])
    return float(total)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, block: int = KERNEL_BLOCK) -> float:
    """KID's statistic on whole sets: unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³ (blockwise)."""
    n, m = len(x), len(y)
    return (cubic_kernel_sum(x, x, True, block) / (n * (n - 1)) + cubic_kernel_sum(y, y, True, block) / (m * (m - 1))
            - 2 * cubic_kernel_sum(x, y, False, block) / (n * m))


def kernel_row_sums(x: np.ndarray, y: np.ndarray, kernel: Callable[[np.ndarray, np.ndarray], np.ndarray] = cubic_kernel,
                    skip_diagonal: bool = False, block: int = KERNEL_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums of the kernel matrix k(x_i, y_j) (less its diagonal when `x` is `y`), a block of rows at a
    time like `cubic_kernel_sum`: what the jackknife needs, since leaving image i out removes its row."""
    rows, columns = np.empty(len(x)), np.zeros(len(y))
    for start in range(0, len(x), block):
        values = kernel(x[start : start + block], y)
        if skip_diagonal:
            np.fill_diagonal(values[:, start : start + block], 0.0)
        rows[start : start + block] = values.sum(1)
        columns += values.sum(0)
    return rows, columns


def cubic_kernel_row_sums(x: np.ndarray, y: np.ndarray, skip_diagonal: bool = False,
                          block: int = KERNEL_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """`kernel_row_sums` of KID's kernel."""
    return kernel_row_sums(x, y, cubic_kernel, skip_diagonal, block)


def jackknife_variance(left_out: np.ndarray) -> float:
    """The jackknife variance of a statistic from its values with each item left out in turn: (n-1)/n Σ(θ_i − θ̄)²."""
    return float((len(left_out) - 1) / len(left_out) * np.sum((left_out - left_out.mean()) ** 2))


@dataclass
class LeaveOneOut:
    """A statistic on whole sets and its values with each image of each set left out in turn (the jackknife)."""

    value: float
    left_out: list[np.ndarray]  # one array per set: the statistic without its image i

    def standard_error(self) -> float:
        """The jackknife standard error over all sets (Efron & Stein: each set's delete-one variances add up)."""
        variance = sum(jackknife_variance(v) for v in self.left_out)
        return float(np.sqrt(variance))


def mmd2_leave_one_out(x: np.ndarray, y: np.ndarray, xx: np.ndarray | None = None, yy: np.ndarray | None = None,
                       block: int = KERNEL_BLOCK, kernel: Callable[[np.ndarray, np.ndarray], np.ndarray] = cubic_kernel
                       ) -> LeaveOneOut:
    """The unbiased MMD² of whole sets (KID's kernel unless told) and its values with each x, then each y left out:
    O(n²) from the kernel's row sums (`xx`, `yy`: the sets' own off-diagonal row sums, when already computed)."""
    n, m = len(x), len(y)
    xx = kernel_row_sums(x, x, kernel, True, block)[0] if xx is None else xx
    yy = kernel_row_sums(y, y, kernel, True, block)[0] if yy is None else yy
    xy_rows, xy_columns = kernel_row_sums(x, y, kernel, False, block)
    sxx, syy, sxy = xx.sum(), yy.sum(), xy_rows.sum()
    value = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    without_x = (sxx - 2 * xx) / ((n - 1) * (n - 2)) + syy / (m * (m - 1)) - 2 * (sxy - xy_rows) / ((n - 1) * m)
    without_y = sxx / (n * (n - 1)) + (syy - 2 * yy) / ((m - 1) * (m - 2)) - 2 * (sxy - xy_columns) / (n * (m - 1))
    return LeaveOneOut(float(value), [without_x, without_y])


KID_CI95_METHOD = "normal, jackknife standard error over every set"


def reference_kernel_rows(reference: np.ndarray, block: int = KERNEL_BLOCK) -> np.ndarray:
    """The reference's own off-diagonal kernel row sums: the largest kernel of every KID, computed once per job."""
    return cubic_kernel_row_sums(reference, reference, True, block)[0]


def kid_ci95(a: np.ndarray, b: np.ndarray, block: int = KERNEL_BLOCK,
             b_rows: np.ndarray | None = None) -> tuple[float, float, list[float]] | None:
    """Whole-set unbiased KID, its jackknife standard error and the normal 95% interval; None below 3 images a set.

    The unbiased estimate is close to normal and the jackknife's standard error nearly unbiased for it
    (tests/test_intervals.py measures the coverage against closed-form population values; the subsets' mean ±
    1.96 std covered 97-100%). `b_rows`: `reference_kernel_rows(b)`, when already computed.
    """
    if len(a) < 3 or len(b) < 3:
        return None
    jack = mmd2_leave_one_out(a, b, yy=b_rows, block=block)
    se = jack.standard_error()
    # floored at 0 like the population MMD² itself (never lowers the coverage)
    return jack.value, se, [max(0.0, jack.value - Z95 * se), max(0.0, jack.value + Z95 * se)]


def kid_subset_size(len_a: int, len_b: int, subset_size: int = 1000) -> int:
    """The subsets' size of `kid`: `subset_size`, or half the smaller set where that is smaller (whole-set "subsets"
    would all be the same draw, and their std 0; torch-fidelity refuses a subset size above a set's)."""
    n = min(len_a, len_b, subset_size)
    return n // 2 if n == min(len_a, len_b) and n >= 4 else n


def kid(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased KID (cubic polynomial kernel MMD², Bińkowski et al. 2018): mean and std over random subsets of
    `kid_subset_size` images."""
    n = kid_subset_size(len(a), len(b), subset_size)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def mean_standard_error(values: np.ndarray, clusters: Sequence | None = None) -> tuple[float, float, int]:
    """The mean of per-item values, its standard error and the degrees of freedom of its Student's t (`mean_ci95`'s;
    the error is nan below 2 items or 2 clusters)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if clusters is None:
        return mean, (float(values.std(ddof=1) / np.sqrt(n)) if n >= 2 else float("nan")), n - 1
    _, group = np.unique(np.asarray(clusters), return_inverse=True)
    count = int(group.max()) + 1 if n else 0
    if count < 2:
        return mean, float("nan"), count - 1
    sums = np.bincount(group, weights=values - mean)
    return mean, float(np.sqrt(count / (count - 1) * np.sum(sums ** 2)) / n), count - 1


def mean_ci95(values: np.ndarray, clusters: Sequence | None = None,
              bounds: tuple[float, float] = (-np.inf, np.inf)) -> list[float]:
    """Student's t 95% interval of the mean of per-item values (held-out losses, forgetting, sketchiness, CLIP score).

    The percentile bootstrap it replaces covered 74% at 3 items and 84% at 5 (too narrow by a factor n/(n-1) and a
    normal quantile for Student's): a forgetting of 3 held-out samples was "significant" one time in four
    (tests/test_intervals.py measures both). With `clusters` (each item's group: the photo a sketch was drawn from)
    items of one group are not independent: the standard error is the cluster-robust one (the groups' summed
    residuals, G/(G-1)) with G - 1 degrees of freedom; one item per group gives the plain interval back. `bounds`:
    where the values can lie (a probability's [0, 1]): the interval never leaves them."""
    from scipy.stats import t

    mean, error, df = mean_standard_error(values, clusters)
    if error != error:
        return [float("nan"), float("nan")]
    half = t.ppf(0.975, df) * error
    return [float(max(mean - half, bounds[0])), float(min(mean + half, bounds[1]))]


def paired_difference(a: np.ndarray, b: np.ndarray, clusters: Sequence | None = None) -> dict:
    """mean(a - b) over paired items (two sets' images of the same items), its Student's t 95% interval and two-sided
    p-value (clustered as `mean_ci95`): did one set move a per-image score (sketchiness) against the other?"""
    from scipy.stats import t

    mean, error, df = mean_standard_error(np.asarray(a, np.float64) - np.asarray(b, np.float64), clusters)
    if error != error:
        return {"difference": mean, "ci95": None, "p": float("nan")}
    if error == 0:
        return {"difference": mean, "ci95": [mean, mean], "p": 0.0 if mean else 1.0}
    half = t.ppf(0.975, df) * error
    return {"difference": mean, "ci95": [mean - half, mean + half], "p": float(2 * t.sf(abs(mean) / error, df))}


def proportion_ci95(outcomes: np.ndarray) -> list[float]:
    """Clopper-Pearson's exact 95% interval of the share of 1s among 0/1 outcomes (CLIP accuracy): it covers the true
    share at least 95% of the time at every count (tests/test_intervals.py computes the exact binomial coverage).

    Wilson's, before, covered as little as 86% at a few images: one image of the right category of 5 gave [0.21, 1],
    "kept the content" above chance 0.2, 20% of the time where the true accuracy is chance. A bootstrap over 0/1
    values collapses to [p, p] where every outcome agrees.
    """
    from scipy.stats import beta

    outcomes = np.asarray(outcomes, dtype=np.float64)
    n, hits = len(outcomes), float(np.sum(outcomes))
    if n < 1:
        return [float("nan"), float("nan")]
    low = 0.0 if hits == 0 else beta.ppf(0.025, hits, n - hits + 1)
    high = 1.0 if hits == n else beta.ppf(0.975, hits + 1, n - hits)
    return [float(low), float(high)]


def bootstrap_ci95(statistic: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray, b: np.ndarray, seed: int = 0,
                   resamples: int = 100, value: float | None = None) -> list[float]:
    """95% basic (pivotal) bootstrap interval of a biased set-vs-set distance, both sets resampled with replacement:
    [2·d − q97.5, 2·d − q2.5] of the resampled distances d*, floored at 0 (a distance is never negative).

    A resample's distance sits above the estimate by about as much as the estimate sits above the population
    value (the bias of FID, FD-DINOv2 and CMMD shrinks as 1/n), so the reflected interval moves down by the bias,
    where percentiles of d* would lie above the estimate and miss the truth (tests/test_intervals.py: 0% coverage).
    `value`: the statistic on the whole sets, when the caller has it already.
    """
    if len(a) < 2 or len(b) < 2 or resamples < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    value = statistic(a, b) if value is None else value
    values = [statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(resamples)]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(max(0.0, 2 * value - high)), float(max(0.0, 2 * value - low))]


FRECHET_CI95_METHOD = "basic bootstrap over both sets (reflected about the estimate: corrects the bias)"
def frechet_images_needed(dims: int) -> int:
    """Images per set a Fréchet distance's bootstrap interval needs to cover (tests/test_intervals.py): 2 per dimension
    at 16 dims, and d²/8 beyond (the covariances' bias grows with d² / n, faster than the bootstrap sees it: at 64 dims
    256 images covered 80%, 512 covered 97%; at 128 dims 512 covered 7%). At 2048 Inception dims: none is honest."""
    return max(2 * dims, -(-dims * dims // 8))  # the ceiling of d²/8


def frechet_ci95(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 100, value: float | None = None) -> dict:
    """A Fréchet distance's (FID, FD-DINOv2) 95% interval with its method, or None with the reason where none is
    honest: with fewer than `frechet_images_needed(dims)` images in either set the covariances' bias is no longer what
    the bootstrap sees. `value`: the distance of the whole sets, when the caller has it."""
    n, dims = min(len(a), len(b)), np.shape(a)[1]
    if n < frechet_images_needed(dims):
        return {"ci95": None, "reason": f"no honest interval: {n} images for {dims}-dim features (a Fréchet distance's "
                f"interval needs {frechet_images_needed(dims)} images in each set); compare KID or CMMD, whose "
                "intervals hold at this size"}
    return {"ci95": bootstrap_ci95(fid_from_features, a, b, seed, resamples, value), "method": FRECHET_CI95_METHOD}


CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


def gaussian_kernel(sigma: float = CMMD_SIGMA) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """CMMD's kernel exp(-|u - v|² / 2σ²), as a function of two sets of rows."""
    gamma = 1 / (2 * sigma**2)

    def kernel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        squared = (u * u).sum(1)[:, None] + (v * v).sum(1)[None, :] - 2 * u @ v.T
        return np.exp(-gamma * np.clip(squared, 0, None))

    return kernel


CMMD_CI95_METHOD = "normal around the unbiased MMD², jackknife standard error over both sets (the value is CMMD's biased one)"


def cmmd_ci95(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> dict:
    """95% interval of the population CMMD: CMMD's reference value averages the kernel's diagonal in, which biases
    it upwards by O(1/n); the unbiased U-statistic of the same MMD² is close to normal, so the interval is it ± 1.96
    jackknife standard errors, as KID's (tests/test_intervals.py: coverage against the closed form of Gaussians)."""
    if len(x) < 3 or len(y) < 3:
        return {"ci95": None, "reason": f"no interval from {min(len(x), len(y))} images"}
    jack = mmd2_leave_one_out(np.asarray(x, np.float64), np.asarray(y, np.float64), kernel=gaussian_kernel(sigma))
    margin = Z95 * jack.standard_error()
    low, high = (scale * max(0.0, v) for v in (jack.value - margin, jack.value + margin))  # an MMD² is never negative
    return {"ci95": [low, high], "method": CMMD_CI95_METHOD}


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD (Jayasumana et al. 2024) as its reference code computes it: scale x MMD² with the Gaussian kernel
    exp(-|u - v|² / 2σ²) on (L2-normalised) CLIP embeddings, every pair averaged (the diagonal included, so
    a set against itself scores exactly 0)."""
    gamma = 1 / (2 * sigma**2)

    def mean_kernel(u: np.ndarray, v: np.ndarray) -> float:
        squared = (u * u).sum(1)[:, None] + (v * v).sum(1)[None, :] - 2 * u @ v.T
        return float(np.exp(-gamma * np.clip(squared, 0, None)).mean())

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0, None))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    """Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) with k-NN balls:
    a real image's ball reaches its k-th nearest other real image (a fake one's, for recall, among fakes).

    Returns each metric and its per-image values (`*_items`: per fake image for precision and density, per
    real image for recall and coverage), whose means they are, for their intervals.
    """
    real_fake = _distances(real, fake)
    real_radius = np.sort(_distances(real, real), axis=1)[:, min(k, len(real) - 1)]  # column 0 is the image itself
    fake_radius = np.sort(_distances(fake, fake), axis=1)[:, min(k, len(fake) - 1)]
    inside = real_fake < real_radius[:, None]  # fake j inside real i's ball
    items = {
        "precision": inside.any(axis=0).astype(np.float64),
        "recall": (real_fake < fake_radius[None, :]).any(axis=1).astype(np.float64),
        "density": inside.sum(axis=0) / k,
        "coverage": (real_fake.min(axis=1) < real_radius).astype(np.float64),
    }
    return {**{name: float(v.mean()) for name, v in items.items()}, **{f"{name}_items": v for name, v in items.items()}}


def zero_shot_correct(image_embeddings: np.ndarray, categories: Sequence[str], class_embeddings: np.ndarray,
                      class_names: Sequence[str]) -> np.ndarray:
    """1.0 where an image's nearest class embedding (cosine) is its own category, else 0.0."""
    predicted = np.asarray(class_names)[np.argmax(image_embeddings @ class_embeddings.T, axis=1)]
    return (predicted == np.asarray(categories)).astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def style_prototype(reference: np.ndarray) -> np.ndarray:
    """A reference's style prototype: the normalised mean of its normalised style embeddings."""
    return _unit(_unit(np.asarray(reference, np.float64)).mean(0))


def prototype_similarity(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each generated image's cosine to the reference's style prototype (CSD's style similarity to a style)."""
    return _unit(np.asarray(generated, np.float64)) @ style_prototype(reference)


CSD_MIN_IMAGES = (5, 10)  # generated, reference: no interval below them
CSD_DIRECTION_RSE = 0.2  # the reference's style direction, relative standard error above which no interval is honest
CSD_TOO_FEW = f"no interval below {CSD_MIN_IMAGES[0]} generated or {CSD_MIN_IMAGES[1]} reference images"
CSD_UNDETERMINED = ("no honest interval: the reference's {m} images do not fix its style direction (their mean's length "
                    "is not known to within 20%; more reference images, or the whole reference rather than a category)")


def _direction_lengths(unit_rows: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean's squared length |E x|² of unit vectors, unbiased (the mean dot product of distinct rows), and the
    same without each row in turn (m >= 3)."""
    m, total = len(unit_rows), unit_rows.sum(0)
    squares = np.einsum("id,id->i", unit_rows, unit_rows)
    pairs = total @ total - squares.sum()
    without = (pairs - 2 * (unit_rows @ total - squares)) / ((m - 1) * (m - 2))  # |s - r_j|² less the squares
    return float(pairs / (m * (m - 1))), without


def _direction_determined(squared: float, without: np.ndarray) -> bool:
    """Whether the reference's mean direction is known: |E x| positive, and its jackknife standard error under
    `CSD_DIRECTION_RSE` of it (a style spread wide in many dimensions needs many images: 50 or more at 64 dims)."""
    if squared <= 0 or (without <= 0).any():
        return False
    lengths = np.sqrt(without)
    return bool(np.sqrt(jackknife_variance(lengths)) < CSD_DIRECTION_RSE * np.sqrt(squared))


def csd_estimate(generated: np.ndarray, reference: np.ndarray) -> dict:
    """CSD of a set: its images' expected cosine to the reference's style prototype, E g · E r / |E r|, with a 95%
    interval ({"csd", "csd_ci95"}, and "csd_ci95_reason" where none is given).

    Estimated as mean(g) · mean(r) / |E r|, |E r| from distinct pairs of reference images: the mean cosine to the
    prototype of m images (the plain estimate) is biased low by the prototype's noise (0.15 for 0.24 at 10 images).
    Interval: jackknife standard errors of both sets' parts, Student's t with Welch's degrees of freedom; given where
    the reference's direction is determined (`_direction_determined`) and at `CSD_MIN_IMAGES` or more; coverage
    0.92-0.99 in simulation from 16 to 768 dimensions (tests/test_intervals.py). Without an interval, the plain estimate.
    """
    from scipy.stats import t

    g, r = _unit(np.asarray(generated, np.float64)), _unit(np.asarray(reference, np.float64))
    n, m = len(g), len(r)
    plain = float((g @ style_prototype(r)).mean()) if n and m else float("nan")
    if n < CSD_MIN_IMAGES[0] or m < CSD_MIN_IMAGES[1]:
        return {"csd": plain, "csd_ci95": None, "csd_ci95_reason": CSD_TOO_FEW}
    squared, without = _direction_lengths(r)
    if not _direction_determined(squared, without):
        return {"csd": plain, "csd_ci95": None, "csd_ci95_reason": CSD_UNDETERMINED.format(m=m)}
    total, g_mean = r.sum(0), g.mean(0)
    value = float(np.clip(g_mean @ total / m / np.sqrt(squared), -1.0, 1.0))  # a cosine's expectation
    per_image = g @ total / m / np.sqrt(squared)  # the statistic is their mean: its jackknife is their spread
    reference_left_out = ((total[None] - r) @ g_mean / (m - 1)) / np.sqrt(without)
    var_generated, var_reference = per_image.var(ddof=1) / n, jackknife_variance(reference_left_out)
    variance = var_generated + var_reference
    if variance <= 0:
        return {"csd": value, "csd_ci95": [min(max(value, -1.0), 1.0)] * 2}
    df = variance ** 2 / (var_generated ** 2 / (n - 1) + var_reference ** 2 / (m - 1))
    half = t.ppf(0.975, df) * np.sqrt(variance)
    return {"csd": value, "csd_ci95": [float(v) for v in np.clip([value - half, value + half], -1.0, 1.0)]}


def csd_of_reference(reference: np.ndarray) -> dict:
    """The reference's own CSD: what a new image of its style scores against its prototype, |E x| (from distinct
    pairs), with a jackknife Student's t 95% interval where its direction is determined (`csd_estimate`'s rules).

    Its images against a prototype they are part of scored 0.49 where the truth was 0.24 at 5 images (23% coverage);
    each left out of its prototype, 0.10: a generated set looked further from the reference than it is."""
    r = _unit(np.asarray(reference, np.float64))
    m = len(r)
    if m < 3:
        return {"csd": float("nan"), "csd_ci95": None, "csd_ci95_reason": "fewer than 3 reference images"}
    squared, without = _direction_lengths(r)
    value = float(np.sqrt(max(squared, 0.0)))
    if m < CSD_MIN_IMAGES[1] or not _direction_determined(squared, without):
        return {"csd": value, "csd_ci95": None,
                "csd_ci95_reason": CSD_TOO_FEW if m < CSD_MIN_IMAGES[1] else CSD_UNDETERMINED.format(m=m)}
    from scipy.stats import t

    half = t.ppf(0.975, m - 1) * np.sqrt(jackknife_variance(np.sqrt(without)))
    return {"csd": value, "csd_ci95": [float(max(value - half, -1.0)), float(min(value + half, 1.0))]}


@dataclass
class LinearProbe:
    """Logistic regression on standardised features: the probability that an image is a sketch (`sketchiness`)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    heldout_accuracy: float = float("nan")
    n_train: int = 0
    n_heldout: int = 0

    def probability(self, features: np.ndarray) -> np.ndarray:
        logits = ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.weights + self.bias
        return 1 / (1 + np.exp(-np.clip(logits, -50, 50)))

    def save(self, path: Path, **about: str) -> None:
        """An .npz of arrays and strings only (`np.load(allow_pickle=False)` reads it back), written atomically."""
        from sketch2real.io import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, scale=self.scale, weights=self.weights, bias=self.bias,
                         heldout_accuracy=self.heldout_accuracy, n_train=self.n_train, n_heldout=self.n_heldout,
                         **{k: np.array(str(v)) for k, v in about.items()})

    @classmethod
    def load(cls, path: Path) -> LinearProbe:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["scale"], data["weights"], float(data["bias"]), float(data["heldout_accuracy"]),
                       int(data["n_train"]), int(data["n_heldout"]))


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, l2: float = 1e-2, iterations: int = 50) -> LinearProbe:
    """L2-regularised logistic regression by Newton's method (a convex problem: ~10 steps, deterministic, no
    learning rate to tune); the penalty keeps the weights finite on separable data."""
    x, y = np.asarray(features, np.float64), np.asarray(labels, np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-8
    design = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    w = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(design @ w, -50, 50)))
        gradient = design.T @ (p - y) / len(y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + np.diag(penalty + 1e-10)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LinearProbe(mean, scale, w[:-1], float(w[-1]), n_train=len(y))


def verdict(ci95: Sequence[float]) -> str:
    """'significant' when a 95% interval of a difference excludes 0, else 'not distinguishable'."""
    low, high = ci95
    return "significant" if (low > 0 or high < 0) else "not distinguishable"


def kid_difference(a: np.ndarray, b: np.ndarray, reference: np.ndarray, block: int = KERNEL_BLOCK,
                   reference_rows: np.ndarray | None = None, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """KID(a, reference) - KID(b, reference) on whole sets (unbiased MMD²) with a normal 95% interval whose standard
    error is the jackknife's over all three sets: each image of a, of b and of the reference left out in turn (a
    reference image moves both terms at once, so their shared part cancels as it should; half-samples divided by
    √2 had understated it: 10-16% false "significant" between two sets of one population).

    `pairs`: rows of a and b drawn together (`paired_rows`: images of one sample, prompt and seed from two models),
    left out together, so what the pair shares cancels as the reference's does (as independent sets the interval was
    1.4-2.2x as wide at correlations 0.5-0.8). `reference_rows`: `reference_kernel_rows(reference)`, computed once for
    every pair of sets. Also returns the standard error and the two-sided p-value of "no difference"."""
    rr = reference_kernel_rows(reference, block) if reference_rows is None else reference_rows
    with_a, with_b = mmd2_leave_one_out(a, reference, yy=rr, block=block), mmd2_leave_one_out(b, reference, yy=rr, block=block)
    rows_a, rows_b = pairs if pairs is not None else (np.zeros(0, int), np.zeros(0, int))
    # Each image's jackknife deviation within its own whole set (scaled as that set's jackknife), so a pair's unit is
    # the difference of its two deviations and an image without a partner keeps its own: exact for sets that pair
    # wholly or not at all, and no group of one or two images loses its share of the variance.
    deviation_a, deviation_b = (np.sqrt((len(v) - 1) / len(v)) * (v - v.mean()) for v in (with_a.left_out[0], with_b.left_out[0]))
    alone_a, alone_b = np.setdiff1d(np.arange(len(a)), rows_a), np.setdiff1d(np.arange(len(b)), rows_b)
    units = np.concatenate([deviation_a[rows_a] - deviation_b[rows_b], deviation_a[alone_a], deviation_b[alone_b]])
    reference_term = LeaveOneOut(0.0, [with_a.left_out[1] - with_b.left_out[1]]).standard_error()
    value = with_a.value - with_b.value
    se = float(np.sqrt((units**2).sum() + reference_term**2))
    if not math.isfinite(se):  # a NaN feature, or a set too small to leave an image out: no verdict either way
        p_value = float("nan")
    else:
        p_value = math.erfc(abs(value) / (se * math.sqrt(2))) if se > 0 else float(value == 0)
    return {"kid_difference": value, "kid_difference_ci95": [value - Z95 * se, value + Z95 * se],
            "kid_difference_se": se, "kid_difference_p": p_value, "pairs": len(rows_a),
            "kid_difference_ci95_method": KID_CI95_METHOD + (", pairs left out together" if len(rows_a) else "")}


def paired_rows(a_ids: Sequence[str], b_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two generated sets that show the same item (one index.jsonl key: one sample, prompt slot and seed)."""
    where_b = {key: j for j, key in enumerate(b_ids)}
    rows = [(i, where_b[key]) for i, key in enumerate(a_ids) if key in where_b]
    return np.array([i for i, _ in rows], dtype=int), np.array([j for _, j in rows], dtype=int)


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: a table of m comparisons is "significant" where its adjusted p < 0.05 keeps the
    chance of any false "significant" in the table at 5%, not 5% per row."""
    p_values = [1.0 if math.isnan(p) else p for p in p_values]  # no p-value (no standard error): never "significant"
    order = np.argsort(p_values, kind="stable")
    adjusted, running = [0.0] * len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def partners_within(groups: Sequence[str], rng: np.random.Generator, sources: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random partner for each item among the items of its group that come from another source (another
    photo: Sketchy's sketches of one photo share its pose); (partner index, has a partner). Items without a
    candidate keep themselves and are marked False. Without `sources` every other item of the group counts."""
    labels = np.asarray(groups)
    origins = np.asarray(sources) if sources is not None else np.arange(len(labels))
    partner, kept = np.arange(len(labels)), np.zeros(len(labels), dtype=bool)
    members: dict = {}  # each group's items, ascending: a group's scan, not the whole set's (quadratic at 55,000)
    for i, label in enumerate(labels.tolist()):
        members.setdefault(label, []).append(i)
    members = {label: np.asarray(items) for label, items in members.items()}
    for i, label in enumerate(labels.tolist()):
        group = members[label]
        candidates = group[origins[group] != origins[i]]
        if len(candidates):
            partner[i], kept[i] = rng.choice(candidates), True
    return partner, kept


def pairing_score(generated: np.ndarray, references: np.ndarray, seed: int = 0, groups: Sequence[str] | None = None,
                  sources: Sequence[str] | None = None) -> dict:
    """Mean cosine similarity of each generated image to its own reference, against a baseline that pairs it with a
    random other reference; the gain's 95% interval is clustered by `sources` (a photo's ~6 sketches share it: as
    independent pairs the interval covered 68-88%), else over pairs.

    With `groups` (each pair's category) the other reference is of its own category, so the gain measures
    following the sample (pose, shape) beyond getting the category right; with `sources` (each pair's photo) it
    is of another photo. Pairs without such a partner are left out.
    """
    def cosine(x, y):
        return np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)

    groups = groups if groups is not None else [""] * len(generated)
    shift, kept = partners_within(groups, np.random.default_rng(seed), sources)
    if not kept.any():
        return {"matched": float("nan"), "shuffled": float("nan"), "gain": float("nan"), "gain_ci95": [float("nan")] * 2, "pairs": 0}
    matched, shuffled = cosine(generated, references)[kept], cosine(generated, references[shift])[kept]
    gains = matched - shuffled
    return {"matched": float(matched.mean()), "shuffled": float(shuffled.mean()), "gain": float(gains.mean()),
            "gain_ci95": mean_ci95(gains, None if sources is None else np.asarray(sources)[kept]),
            "pairs": int(kept.sum())}


@torch.no_grad()
def clip_scores(paths: Sequence[Path], prompts: Sequence[str], model_name_or_path: str, device: torch.device,
                batch_size: int = 32) -> np.ndarray:
    """Each image's 100 x cos(image, prompt), unclamped (NaN for an unreadable image): `clip_score_of` turns them
    into the set's CLIP score as torchmetrics does (the mean, then clamped at 0)."""
    from transformers import CLIPModel, CLIPProcessor

    from sketch2real.models import load

    model = load(CLIPModel, model_name_or_path, "CLIP model").to(device).eval()
    processor = load(CLIPProcessor, model_name_or_path, "CLIP processor")
    scores, readable = [], []
    for start in range(0, len(paths), batch_size):
        images = [_readable_or_none(p) for p in paths[start : start + batch_size]]
        readable += [image is not None for image in images]
        images = [image or Image.new("RGB", (8, 8), "white") for image in images]
        inputs = processor(text=list(prompts[start : start + batch_size]), images=images, return_tensors="pt",
                           padding=True, truncation=True).to(device)
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        text = text.pooler_output if hasattr(text, "pooler_output") else text
        cosine = torch.nn.functional.cosine_similarity(image, text)
        scores += (100 * cosine).tolist()
    scores = np.asarray(scores, dtype=np.float64)
    scores[~np.asarray(readable, dtype=bool)] = np.nan  # unreadable images: counted, not scored
    return scores


def clip_score_of(values: np.ndarray) -> tuple[float, list[float]]:
    """A set's CLIP score, max(mean of 100 x cos, 0) as torchmetrics' CLIPScore computes it (it clamps the mean, not
    each image: Hessel et al.'s max(·, 0) per image would lift sets of mostly unrelated images), and the 95%
    interval of that mean (`mean_ci95`), clamped the same way."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    low, high = mean_ci95(values)
    return float(max(values.mean(), 0.0)), [float(max(low, 0.0)), float(max(high, 0.0))]


def _readable_or_none(path: Path) -> Image.Image | None:
    try:
        return open_image(path, upright=False)  # as the features read it
    except CorruptSample as err:
        corrupt_samples.record(err)
        return None
