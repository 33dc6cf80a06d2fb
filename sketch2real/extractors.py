"""Feature extractors for evaluation, one interface for all: pytorch-fid's Inception (FID, KID, pairing), DINOv2
(FD-DINOv2 and PRDC, Stein et al. 2023), CLIP image embeddings (CMMD, Jayasumana et al. 2024; zero-shot
category accuracy; the sketchiness probe), CSD style embeddings (Somepalli et al. 2024) and each image's grey-level
spread (blank canvases, which the sketchiness probe alone reads as sketches). Each extracts the
contiguous part of an ImageSet that belongs to one rank; its `settings` key the feature cache."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sketch2real.cli import UserError
from sketch2real.metrics import ImageSet, _Loader, extract_features, inception, loader_batches, rank_range
from sketch2real.models import model_identity, weight_files_identity
from sketch2real.shards import CorruptSample, corrupt_samples

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
        except CorruptSample as err:  # counted and skipped, never fatal; warned once per file, not per extractor
            corrupt_samples.record(err)
            return None, False, err.where
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0], True, ""


def _collate_processed(batch):
    side = next((t.shape for t, ok, _ in batch if ok), None)
    tensors = [t if ok else torch.zeros(side) for t, ok, _ in batch] if side is not None else []
    return (torch.stack(tensors) if tensors else None), torch.tensor([ok for _, ok, _ in batch]), [e for _, _, e in batch]


@torch.inference_mode()
def extract_processed(images: ImageSet, processor, embed: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                      batch_size: int, num_workers: int, rank: int, world_size: int, name: str,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`embed(pixel_values)` for this rank's contiguous part of `images` (`rank_range`), as float64, with a validity
    mask."""
    from tqdm.auto import tqdm

    start, end = rank_range(len(images), batch_size, rank, world_size)
    loader = torch.utils.data.DataLoader(_Processed(images.sources[start:end], processor), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate_processed,
                                         pin_memory=device.type == "cuda")
    rows, valid = [], []
    with loader_batches(loader) as batches:
        for pixels, ok, errors in tqdm(batches, desc=f"{name} {images.name}", unit="batch", disable=not progress):
            corrupt_samples.merge({where: "unreadable" for where in errors if where})  # warned in the worker
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


BLANK_SPREAD = 0.02  # grey-level standard deviation (0-1) below which an image is a blank canvas: a sparse sketch's is ~0.15


def grey_spread(image) -> float:
    """An image's grey levels' standard deviation, on a 0-1 scale, at its own size (below `BLANK_SPREAD`: blank)."""
    return float((np.asarray(image.convert("L"), dtype=np.float64) / 255).std())


class _GreySpread:
    """An image processor's interface (`processor(images=image, return_tensors="pt")["pixel_values"]`) giving one
    number per image: its `grey_spread`."""

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        return {"pixel_values": torch.tensor([[grey_spread(images)]], dtype=torch.float64)}


def pixel_spread_extractor(batch_size: int, num_workers: int) -> Extractor:
    """Each image's grey-level spread (`_GreySpread`), read in loader workers like the networks' inputs: a model that
    collapsed to blank canvases has none, where the sketchiness probe scored white images above real sketches."""

    def extract(images: ImageSet, rank: int, world_size: int, progress: bool):
        return extract_processed(images, _GreySpread(), lambda spread: spread, torch.device("cpu"), batch_size,
                                 num_workers, rank, world_size, "grey spread", progress)

    return Extractor("pixels", {"features": "grey-level-std", "model": "none"}, extract)


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

    return Extractor("dinov2", {"model": model_name_or_path, "weights": model_identity(model_name_or_path),
                                "features": "dinov2-cls"}, extract)


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

    return Extractor("clip", {"model": model_name_or_path, "weights": model_identity(model_name_or_path),
                              "features": "clip-image-normalised"}, extract,
                     {"model": model, "processor": processor, "device": device})


@torch.inference_mode()
def clip_text_embeddings(extractor: Extractor, prompts: list[str]) -> np.ndarray:
    """L2-normalised CLIP text embeddings of `prompts`, from the extractor's model."""
    model, processor, device = extractor.extras["model"], extractor.extras["processor"], extractor.extras["device"]
    inputs = processor(text=prompts, return_tensors="pt", padding=True, truncation=True).to(device)
    output = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    output = output.pooler_output if hasattr(output, "pooler_output") else output
    return torch.nn.functional.normalize(output, dim=-1).float().cpu().numpy().astype(np.float64)


# ---- CSD: style embeddings (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion Models") ----------------
DEFAULT_CSD = "tomg-group-umd/CSD-ViT-L"  # MIT; a CLIP ViT-L/14 image tower + a style projection, trained for style
CSD_FILES = ("model.safetensors", "pytorch_model.bin", "checkpoint.pth")  # tried in this order in a folder or hub repo
VISION_PREFIX = "vision_model."  # converted names, placed under the vision tower's own prefix when loading


class CSDStyle(torch.nn.Module):
    """CSD's style branch: a CLIP vision transformer's pooled feature (its final layer norm of the class token, the
    projection dropped) times CSD's style projection, L2-normalised. The content branch is not needed here."""

    def __init__(self, vision_config, style_dim: int):
        from transformers import CLIPVisionModel

        super().__init__()
        self.vision = CLIPVisionModel(vision_config)
        self.style = torch.nn.Parameter(torch.zeros(vision_config.hidden_size, style_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feature = self.vision(pixel_values=pixel_values).pooler_output
        return torch.nn.functional.normalize(feature @ self.style, dim=-1)


def csd_state_dict_to_transformers(state: dict[str, torch.Tensor], vision: str) -> dict[str, torch.Tensor]:
    """CSD's checkpoint keys (OpenAI CLIP's visual tower under `backbone.`, `last_layer_style`; any `module.` prefix
    of DataParallel stripped) -> transformers' CLIP vision transformer names (under `vision`, the prefix of
    `CSDStyle`'s vision tower, which differs between transformers versions) and `style`. The fused attention input
    projection of OpenAI's layout is split into query, key and value, in that order."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    renamed = {"backbone.class_embedding": f"{vision}embeddings.class_embedding",
               "backbone.positional_embedding": f"{vision}embeddings.position_embedding.weight",
               "backbone.conv1.weight": f"{vision}embeddings.patch_embedding.weight", "last_layer_style": "style"}
    parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in renamed:
            out[renamed[key]] = value
        elif key.startswith(("backbone.ln_pre.", "backbone.ln_post.")):
            norm, field = key.split(".")[1:]
            out[f"{vision}{'pre_layrnorm' if norm == 'ln_pre' else 'post_layernorm'}.{field}"] = value
        elif key.startswith("backbone.transformer.resblocks."):
            layer, rest = key.removeprefix("backbone.transformer.resblocks.").split(".", 1)
            prefix = f"{vision}encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                field = "weight" if rest.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{field}"] = chunk
            else:
                module, field = rest.rsplit(".", 1)
                out[f"{prefix}{parts[module]}.{field}"] = value
        # backbone.proj (CLIP's own projection; CSD drops it) and last_layer_content (CSD's content branch): unused
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: safetensors, or `torch.load(weights_only=True)` admitting numpy scalars and dtypes
    (plain data some checkpoints carry beside their weights), never arbitrary pickled objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    core = getattr(np, "_core", None) or np.core
    data_globals = [*TORCH_SAFE_GLOBALS, core.multiarray.scalar,
                    *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))]
    with torch.serialization.safe_globals(data_globals):
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict"):  # CSD's training script nests the weights
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _csd_files(name_or_path: str) -> tuple[Path, dict]:
    """(weights file, config.json contents or {}) of a CSD checkpoint file, folder or hub repo."""
    import json

    from sketch2real.models import check_model_path

    check_model_path(name_or_path, "CSD model")
    path = Path(name_or_path)
    if path.is_file():
        config_file = path.parent / "config.json"
        return path, json.loads(config_file.read_text()) if config_file.is_file() else {}
    if path.is_dir():
        found = next((path / f for f in CSD_FILES if (path / f).is_file()), None)
        if found is None:
            raise UserError(f"no CSD weights in {name_or_path} (looked for {', '.join(CSD_FILES)})")
        return found, json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    unreachable = []

    def fetched(filename: str) -> Path | None:  # each file asked for by name: offline, the hub cache answers
        try:
            return Path(hf_hub_download(name_or_path, filename))
        except LocalEntryNotFoundError:  # not in the cache, and offline or no network
            unreachable.append(filename)
        except EntryNotFoundError:  # not in the repo
            pass
        except OSError as err:  # a gated or missing repo, an HTTP error
            raise UserError(f"cannot load CSD model from {name_or_path}: {str(err).strip().splitlines()[0]}") from err
        return None

    weights = next((found for f in CSD_FILES if (found := fetched(f)) is not None), None)
    if weights is None:
        where = "the hub cache (the hub cannot be reached)" if unreachable else "the hub repo"
        raise UserError(f"no CSD weights of {name_or_path} in {where} (looked for {', '.join(CSD_FILES)})")
    config_file = fetched("config.json")
    return weights, json.loads(config_file.read_text()) if config_file is not None else {}


def load_csd(name_or_path: str) -> tuple[CSDStyle, int]:
    """CSD's style model from a checkpoint file, a folder or a hub id, and its input size in pixels.

    The architecture is read off the weights (width and patch from the patch embedding, depth from the blocks, input
    size from the position embeddings); heads from `vision_heads` in config.json, else OpenAI's rule width / 64.
    """
    from transformers import CLIPVisionConfig

    file, config = _csd_files(name_or_path)
    try:
        vision = VISION_PREFIX
        state = csd_state_dict_to_transformers(_read_state_dict(file), vision)
        patch = state[f"{vision}embeddings.patch_embedding.weight"]
        width, patch_size = patch.shape[0], patch.shape[-1]
        layers = len({k.removeprefix(f"{vision}encoder.layers.").split(".")[0] for k in state
                      if k.startswith(f"{vision}encoder.layers.")})
        side = patch_size * round((state[f"{vision}embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
        vision_config = CLIPVisionConfig(hidden_size=width, intermediate_size=state[f"{vision}encoder.layers.0.mlp.fc1.weight"].shape[0],
                                         num_hidden_layers=layers, num_attention_heads=config.get("vision_heads", width // 64),
                                         image_size=side, patch_size=patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        model = CSDStyle(vision_config, state["style"].shape[1])
        actual = next(k for k in model.state_dict() if k.endswith("embeddings.class_embedding")).removesuffix(
            "embeddings.class_embedding")
        model.load_state_dict({actual + k.removeprefix(vision) if k.startswith(vision) else k: v for k, v in state.items()},
                              strict=True)
    except (KeyError, RuntimeError, ValueError, OSError, pickle.UnpicklingError) as err:  # refused pickles included
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a CSD model from {name_or_path}: {first[:300]}") from err
    return model.eval(), side


def csd_extractor(model_name_or_path: str, device: torch.device, batch_size: int, num_workers: int) -> Extractor:
    """CSD style embeddings (normalised), images as CSD's evaluation prepares them: bicubic resize of the short side
    and centre crop to the model's input size, CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    model, side = load_csd(model_name_or_path)
    model = model.to(device)
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    def extract(images: ImageSet, rank: int, world_size: int, progress: bool):
        return extract_processed(images, processor, model, device, batch_size, num_workers, rank, world_size, "CSD", progress)

    return Extractor("csd", {"model": model_name_or_path, "weights": weight_files_identity(_csd_files(model_name_or_path)[0]),
                             "features": "csd-style"}, extract)
