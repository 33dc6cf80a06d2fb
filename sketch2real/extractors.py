"""Feature extractors for evaluation, one interface for all: pytorch-fid's Inception (FID, KID, pairing), DINOv2
(FD-DINOv2 and PRDC, Stein et al. 2023) and CLIP image embeddings (CMMD, Jayasumana et al. 2024; zero-shot
category accuracy). Each extracts the contiguous part of an ImageSet that belongs to one rank; its `settings`
key the feature cache."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from sketch2real.metrics import ImageSet, _Loader, extract_features, inception

DEFAULT_DINOV2 = "facebook/dinov2-large"  # ViT-L/14, the network of dgm-eval's FD-DINOv2
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # CMMD's CLIP (ViT-L/14 at 336 px)


@dataclass
class Extractor:
    """A feature network: `extract(images, rank, world_size, progress)` -> (features, valid mask) for that rank's part."""

    name: str
    settings: dict
    extract: Callable[[ImageSet, int, int, bool], tuple[np.ndarray, np.ndarray]]
    extras: dict = field(default_factory=dict)  # what else a metric needs (CLIP's text tower, its processor)


class _Processed(_Loader):
    """Images through a transformers image processor (its resize, crop and normalisation), in loader workers."""

    def __init__(self, sources: list, processor):
        super().__init__(sources)
        self.processor = processor

    def __getitem__(self, i: int):
        try:
            image = self._open(self.sources[i]).convert("RGB")
        except Exception as err:  # reported and skipped, never fatal
            return None, False, f"{self.sources[i]}: {err}"
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0], True, ""


def _collate_processed(batch):
    side = next((t.shape for t, ok, _ in batch if ok), None)
    tensors = [t if ok else torch.zeros(side) for t, ok, _ in batch] if side is not None else []
    return (torch.stack(tensors) if tensors else None), torch.tensor([ok for _, ok, _ in batch]), [e for _, _, e in batch]


@torch.inference_mode()
def extract_processed(images: ImageSet, processor, embed: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                      batch_size: int, num_workers: int, rank: int, world_size: int, name: str,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`embed(pixel_values)` for this rank's contiguous part of `images`, as float64, with a validity mask."""
    from tqdm.auto import tqdm

    start, end = rank * len(images) // world_size, (rank + 1) * len(images) // world_size
    loader = torch.utils.data.DataLoader(_Processed(images.sources[start:end], processor), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate_processed,
                                         pin_memory=device.type == "cuda")
    rows, valid = [], []
    for pixels, ok, errors in tqdm(loader, desc=f"{name} {images.name}", unit="batch", disable=not progress):
        for error in errors:
            if error:
                warnings.warn(f"unreadable image skipped: {error}", stacklevel=2)
        if pixels is None:
            rows.append(None)
        else:
            rows.append(embed(pixels.to(device, non_blocking=True)).float().cpu().numpy().astype(np.float64))
        valid.append(ok.numpy())
    dims = next((r.shape[1] for r in rows if r is not None), 1)
    features = [r if r is not None else np.zeros((len(v), dims)) for r, v in zip(rows, valid)]
    if not features:
        return np.zeros((0, dims)), np.zeros(0, dtype=bool)
    return np.concatenate(features), np.concatenate(valid)


def inception_extractor(dims: int, device: torch.device, batch_size: int, num_workers: int, resize: int | None = None,
                        clean_resize: bool = False, channels_last: bool = False) -> Extractor:
    """pytorch-fid's InceptionV3 pool features (exactly its values unless `channels_last` or `clean_resize`)."""
    model = inception(dims, device, channels_last)
    settings = {"dims": dims, "resize": resize or 0, "model": "pytorch-fid-inception-v3",
                **({"channels_last": True} if channels_last else {}), **({"clean_resize": True} if clean_resize else {})}

    def extract(images: ImageSet, rank: int, world_size: int, progress: bool):
        return extract_features(images, model, dims, device, batch_size, num_workers, rank, world_size, resize or None,
                                progress=progress, channels_last=channels_last, clean_resize=clean_resize)

    return Extractor("inception", settings, extract)


def dinov2_extractor(model_name_or_path: str, device: torch.device, batch_size: int, num_workers: int) -> Extractor:
    """DINOv2's class token after its final layer norm (dgm-eval's features), images through its own processor
    (bicubic resize, centre crop to 224, ImageNet normalisation)."""
    from transformers import AutoImageProcessor, Dinov2Model

    from sketch2real.models import load

    model = load(Dinov2Model, model_name_or_path, "DINOv2 model").to(device).eval()
    processor = load(AutoImageProcessor, model_name_or_path, "DINOv2 image processor")

    def extract(images: ImageSet, rank: int, world_size: int, progress: bool):
        return extract_processed(images, processor, lambda x: model(pixel_values=x).pooler_output, device, batch_size,
                                 num_workers, rank, world_size, "DINOv2", progress)

    return Extractor("dinov2", {"model": model_name_or_path, "features": "dinov2-cls"}, extract)


def clip_extractor(model_name_or_path: str, device: torch.device, batch_size: int, num_workers: int) -> Extractor:
    """CLIP image embeddings, L2-normalised (CMMD's features), images through CLIP's processor (bicubic resize,
    centre crop). `extras` carries the model and processor for text prompts (zero-shot accuracy)."""
    from transformers import CLIPModel, CLIPProcessor

    from sketch2real.models import load

    model = load(CLIPModel, model_name_or_path, "CLIP model").to(device).eval()
    processor = load(CLIPProcessor, model_name_or_path, "CLIP processor")

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        output = model.get_image_features(pixel_values=pixels)
        output = output.pooler_output if hasattr(output, "pooler_output") else output
        return torch.nn.functional.normalize(output, dim=-1)

    def extract(images: ImageSet, rank: int, world_size: int, progress: bool):
        return extract_processed(images, processor.image_processor, embed, device, batch_size, num_workers, rank,
                                 world_size, "CLIP", progress)

    return Extractor("clip", {"model": model_name_or_path, "features": "clip-image-normalised"}, extract,
                     {"model": model, "processor": processor, "device": device})


@torch.inference_mode()
def clip_text_embeddings(extractor: Extractor, prompts: list[str]) -> np.ndarray:
    """L2-normalised CLIP text embeddings of `prompts`, from the extractor's model."""
    model, processor, device = extractor.extras["model"], extractor.extras["processor"], extractor.extras["device"]
    inputs = processor(text=prompts, return_tensors="pt", padding=True, truncation=True).to(device)
    output = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    output = output.pooler_output if hasattr(output, "pooler_output") else output
    return torch.nn.functional.normalize(output, dim=-1).float().cpu().numpy().astype(np.float64)
