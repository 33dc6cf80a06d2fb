"""Inception features exactly as pytorch-fid computes them, FID, unbiased KID, per category,
cached reference statistics, pairing scores, and (optionally) CLIP score."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sketch2real.cli import UserError

logger = logging.getLogger("sketch2real")
VALID_DIMS = (64, 192, 768, 2048)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


@dataclass
class ImageSet:
    """Images to score: a name, each image's loader spec, id and category (and paired sample key)."""

    name: str
    sources: list  # Path, or (shard_dir, split, key, field)
    ids: list[str]
    categories: list[str]
    sample_keys: list[str]
    prompts: list[str] | None = None  # the prompt of each generated image (from index.jsonl)

    def __len__(self) -> int:
        return len(self.ids)


def folder_set(folder: str, name: str | None = None) -> ImageSet:
    """A folder of images (recursive). With an index.jsonl (from infer/generate.py), categories come from it."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder not found: {folder}")
    index = root / "index.jsonl"
    if index.is_file():
        from sketch2real.io import read_jsonl

        rows = [r for r in read_jsonl(index) if (root / r["image"]).is_file()]
        rows.sort(key=lambda r: r["key"])
        paths = [root / r["image"] for r in rows]
        categories = [r.get("category", "") for r in rows]
        keys = [r.get("sample_key", "") for r in rows]
        prompts = [r.get("prompt", "") for r in rows]
    else:
        prompts = None
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        categories = [str(p.parent.relative_to(root)) if p.parent != root else "" for p in paths]
        keys = [""] * len(paths)
    if not paths:
        raise UserError(f"no images in {folder}")
    return ImageSet(name or root.name, paths, [str(p.relative_to(root)) for p in paths], categories, keys, prompts)


def shard_set(shard_dir: str, split: str, field: str, categories: Sequence[str] | None = None) -> ImageSet:
    """The sketches or photos of a split, read straight from the shards."""
    from sketch2real.shards import sample_refs

    refs = sample_refs(shard_dir, split, categories)
    if not refs:
        raise UserError(f"no samples in split {split!r} of {shard_dir}")
    return ImageSet(f"{split} {field}s", [(shard_dir, split, r.key, field) for r in refs], [r.key for r in refs],
                    [r.category for r in refs], [r.key for r in refs])


def fingerprint(images: ImageSet, settings: dict) -> str:
    """A key for cached statistics: the exact image contents (or shard rows) and the extraction settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
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
        if isinstance(source, Path):
            return Image.open(source)
        shard_dir, split, key, field = source
        from sketch2real.shards import IMAGE_FIELDS, ShardSamples

        if (shard_dir, split) not in self._samples:
            samples = ShardSamples(shard_dir, split, fields=(field,), as_tensor=False)
            self._samples[(shard_dir, split)] = (samples, {r.key: r for r in samples.refs})
        samples, refs = self._samples[(shard_dir, split)]
        ref = refs[key]
        return Image.open(io.BytesIO(samples._member(ref.shard, f"{key}.{IMAGE_FIELDS[field]}")))

    def __getitem__(self, i: int):
        import torchvision.transforms.functional as TF

        try:
            image = self._open(self.sources[i]).convert("RGB")
        except Exception as err:  # reported and skipped, never fatal
            return torch.zeros(3, self.resize or 8, self.resize or 8), False, f"{self.sources[i]}: {err}"
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


def open_images(sources: Sequence) -> list[Image.Image]:
    """An ImageSet's sources (files or shard rows) decoded as RGB images."""
    loader = _Loader(list(sources))
    return [loader._open(source).convert("RGB") for source in loader.sources]


def thumbnails(sources: Sequence, side: int = 16) -> np.ndarray:
    """Each image as a grey side x side thumbnail (box filter), flattened and centred: a feature space that keeps
    where things are, for pairing scores (pooled network features are nearly translation invariant)."""
    rows = []
    for image in open_images(sources):
        array = np.asarray(image.convert("L").resize((side, side), Image.BOX), dtype=np.float64).ravel()
        rows.append(array - array.mean())
    return np.stack(rows)


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


@torch.inference_mode()
def extract_features(images: ImageSet, model, dims: int, device: torch.device, batch_size: int = 50, num_workers: int = 2,
                     rank: int = 0, world_size: int = 1, resize: int | None = None, progress: bool = True,
                     channels_last: bool = False, clean_resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features of this rank's contiguous part of `images` (float64, as pytorch-fid) and a validity mask."""
    from torch.nn.functional import adaptive_avg_pool2d
    from tqdm.auto import tqdm

    start, end = rank * len(images) // world_size, (rank + 1) * len(images) // world_size
    loader = torch.utils.data.DataLoader(_Loader(images.sources[start:end], resize, clean_resize), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    features, valid = np.empty((end - start, dims)), np.zeros(end - start, dtype=bool)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    position = 0
    for batch, ok, errors in tqdm(loader, desc=f"features {images.name}", unit="batch", disable=not progress):
        prediction = model(batch.to(device, non_blocking=True, memory_format=layout))[0]
        if prediction.size(2) != 1 or prediction.size(3) != 1:
            prediction = adaptive_avg_pool2d(prediction, output_size=(1, 1))
        n = batch.shape[0]
        features[position : position + n] = prediction.squeeze(3).squeeze(2).cpu().numpy()
        valid[position : position + n] = ok.numpy()
        for error in errors:
            if error:
                warnings.warn(f"unreadable image skipped: {error}", stacklevel=2)
        position += n
    return features, valid


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
    the centred features A, B: the eigenvalues of an n x n Gram matrix instead of anything 2048².
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*statistics(a), *statistics(b))
    a_centred, b_centred = a - a.mean(0), b - b.mean(0)
    cross = a_centred @ b_centred.T
    gram = cross.T @ cross if len(b) <= len(a) else cross @ cross.T
    nuclear_norm = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (a_centred**2).sum() / (len(a) - 1) + (b_centred**2).sum() / (len(b) - 1)
                 - 2 * nuclear_norm / scale)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """KID's statistic on whole sets: unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³."""
    dims = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / dims + 1) ** 3, (y @ y.T / dims + 1) ** 3, (x @ y.T / dims + 1) ** 3
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def kid(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased KID (cubic polynomial kernel MMD², Bińkowski et al. 2018): mean and std over random subsets."""
    n = min(len(a), len(b), subset_size)
    if n == min(len(a), len(b)) and n >= 4:
        n //= 2  # whole-set "subsets" would all be the same draw: halve them so the std means something
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def mean_ci95(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-item values (items resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def bootstrap_ci95(statistic: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray, b: np.ndarray, seed: int = 0,
                   resamples: int = 100) -> list[float]:
    """95% percentile-bootstrap interval of a set-vs-set statistic: both sets' images resampled with replacement."""
    if len(a) < 2 or len(b) < 2 or resamples < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    values = [statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(resamples)]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


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
    real image for recall and coverage), whose means they are, for bootstrap intervals.
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


def verdict(ci95: Sequence[float]) -> str:
    """'significant' when a 95% interval of a difference excludes 0, else 'not distinguishable'."""
    low, high = ci95
    return "significant" if (low > 0 or high < 0) else "not distinguishable"


def kid_difference(a: np.ndarray, b: np.ndarray, reference: np.ndarray, seed: int = 0, rounds: int = 500) -> dict:
    """KID(a, reference) - KID(b, reference) on whole sets, with a 95% interval by half-sampling: each round
    scores random halves (drawn without replacement, so the unbiased statistic stays unbiased); an MMD²
    estimate's variance goes as 1/n, so the whole-set std is the halves' std / √2 (normal interval)."""
    rng = np.random.default_rng(seed)
    difference = mmd2_unbiased(a, reference) - mmd2_unbiased(b, reference)

    def half(x: np.ndarray) -> np.ndarray:
        return x[rng.choice(len(x), max(2, len(x) // 2), replace=False)]

    halves = [mmd2_unbiased(half(a), r) - mmd2_unbiased(half(b), r) for r in (half(reference) for _ in range(rounds))]
    margin = 1.96 * float(np.std(halves) / np.sqrt(2))
    return {"kid_difference": difference, "kid_difference_ci95": [difference - margin, difference + margin]}


def partners_within(groups: Sequence[str], rng: np.random.Generator, sources: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random partner for each item among the items of its group that come from another source (another
    photo: Sketchy's sketches of one photo share its pose); (partner index, has a partner). Items without a
    candidate keep themselves and are marked False. Without `sources` every other item of the group counts."""
    labels = np.asarray(groups)
    origins = np.asarray(sources) if sources is not None else np.arange(len(labels))
    partner, kept = np.arange(len(labels)), np.zeros(len(labels), dtype=bool)
    for i in range(len(labels)):
        candidates = np.flatnonzero((labels == labels[i]) & (origins != origins[i]))
        if len(candidates):
            partner[i], kept[i] = rng.choice(candidates), True
    return partner, kept


def pairing_score(generated: np.ndarray, references: np.ndarray, seed: int = 0, groups: Sequence[str] | None = None,
                  sources: Sequence[str] | None = None) -> dict:
    """Mean cosine similarity of each generated image to its own reference, against a baseline that pairs it with a
    random other reference; the gain's 95% interval bootstraps over pairs.

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
            "gain_ci95": mean_ci95(gains, seed), "pairs": int(kept.sum())}


@torch.no_grad()
def clip_scores(paths: Sequence[Path], prompts: Sequence[str], model_name_or_path: str, device: torch.device,
                batch_size: int = 32) -> np.ndarray:
    """Each image's CLIP score, 100 x max(cos(image, prompt), 0) (Hessel et al., 2021; torchmetrics' convention:
    the set's CLIP score is their mean)."""
    from transformers import CLIPModel, CLIPProcessor

    from sketch2real.models import load

    model = load(CLIPModel, model_name_or_path, "CLIP model").to(device).eval()
    processor = load(CLIPProcessor, model_name_or_path, "CLIP processor")
    scores = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        inputs = processor(text=list(prompts[start : start + batch_size]), images=images, return_tensors="pt",
                           padding=True, truncation=True).to(device)
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        text = text.pooler_output if hasattr(text, "pooler_output") else text
        cosine = torch.nn.functional.cosine_similarity(image, text)
        scores += (100 * cosine.clamp(min=0)).tolist()
    return np.asarray(scores, dtype=np.float64)
