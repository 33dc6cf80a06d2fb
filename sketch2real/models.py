"""Loading Stable Diffusion components from a hub id or a local folder, with one-line errors."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sketch2real.cli import UserError
from sketch2real.family import Family, family_of_class, model_index, pipeline_class, pipeline_settings
from sketch2real.io import umask_modes


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds a snapshot of `repo_id` (downloaded before, e.g. on a login node)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)
    except OSError:  # LocalEntryNotFoundError
        return False
    return True


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")


def _sampled_hash(file: Path, window: int = 1 << 20) -> str:
    """sha256 of `window` bytes at the start, middle and end of `file` (the whole of a small one): milliseconds for a
    10 GB checkpoint, and retrained weights differ in each window (a safetensors header alone is the first few KB)."""
    import hashlib

    digest, size = hashlib.sha256(), file.stat().st_size
    with open(file, "rb") as f:
        for start in sorted({0, max(0, size // 2 - window // 2), max(0, size - window)}):
            f.seek(start)
            digest.update(f.read(window))
    return digest.hexdigest()[:16]


def weight_files_identity(path: Path) -> str:
    """What a weight file, or a folder's weight files (its training checkpoints and validation images aside), hold:
    their names, sizes and a hash of 1 MiB at their start, middle and end (weights trained again keep their size)."""
    import hashlib
    import json

    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else [f for f in sorted(folder.rglob("*")) if f.suffix in _WEIGHT_FILES and
                                           not f.relative_to(folder).parts[0].startswith(("checkpoint-", "validation"))]
    held = {str(f.relative_to(folder)): [f.stat().st_size, _sampled_hash(f)] for f in files}
    return hashlib.sha256(json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(name_or_path: str) -> str:
    """`weight_files_identity` of a local model, or of the snapshot the hub cache holds for a hub id (another revision
    downloaded is another); the id as written where no snapshot is cached. Cached features are keyed by it: weights
    replaced in place, or a relative path run from another folder, are not the features cached before."""
    if Path(name_or_path).exists():
        return weight_files_identity(Path(name_or_path))
    if _is_hub_id(name_or_path):
        from huggingface_hub import snapshot_download

        try:
            return weight_files_identity(Path(snapshot_download(name_or_path, local_files_only=True)))
        except OSError:  # LocalEntryNotFoundError
            pass
    return name_or_path


def local_model_identity(name_or_path: str) -> str:
    """`weight_files_identity` of a local model folder or file; "" for a hub id: a hub snapshot is read from the cache
    only once downloaded, and a cache shared by jobs gains files (another variant), so an identity of it would differ
    between a job that downloads the model and its requeue that finds it (the id and revision say which model it is)."""
    return weight_files_identity(Path(name_or_path)) if name_or_path and Path(name_or_path).exists() else ""


def check_peft_for_text_encoder_adapters() -> None:
    """One line, before any model loads, where the installed transformers adds adapters to text encoders only with a
    newer peft than the installed one (transformers 5.25 needs peft 0.22; pip keeps an older peft that meets
    requirements.txt): its error came after loading, as a traceback."""
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return
    installed = version("peft")
    if Version(installed) < Version(MIN_PEFT_VERSION):
        raise UserError(f"--train_text_encoder with LoRA: transformers {version('transformers')} adds the text encoders' "
                        f"adapters with peft >= {MIN_PEFT_VERSION}, and peft {installed} is installed "
                        f"(pip install -U 'peft>={MIN_PEFT_VERSION}')")


def check_model_path(name_or_path: str, what: str = "model") -> None:
    """Fail early, in one line, for a local path that does not exist, or a hub id that offline (HF_HUB_OFFLINE=1,
    as on compute nodes without network) is not in the hub cache."""
    if not name_or_path:
        raise UserError(f"no {what} given (--pretrained_model_name_or_path)")
    if Path(name_or_path).exists():
        return
    if not _is_hub_id(name_or_path):
        raise UserError(f"{what} not found: {name_or_path} (give a local folder, or a hub id with network access)")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(name_or_path):
        raise UserError(f"{what} not found: {name_or_path} is not in the hub cache and HF_HUB_OFFLINE=1 (download it "
                        f"first where there is network: `hf download {name_or_path}`; or give a local folder)")


def load(cls: Any, name_or_path: str, what: str = "model", **kwargs: Any) -> Any:
    """`cls.from_pretrained(name_or_path, **kwargs)` with a one-line error for a missing model. A precision is
    `dtype=` (diffusers >= 0.40 and transformers >= 5.6; diffusers warns at every `torch_dtype=`)."""
    check_model_path(name_or_path, what)
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {what} from {name_or_path}: {first}") from err


@dataclass
class SDComponents:
    """The parts of a diffusion checkpoint that training needs; `family` names its text encoders and tokenizers
    (SDXL: two of each; SD3: three) and its denoiser (a UNet, or SD3's transformer)."""

    family: Family
    tokenizer: Any
    text_encoder: Any
    vae: Any
    denoiser: Any
    noise_scheduler: Any  # the training scheduler (DDPM, or flow matching)
    settings: dict = field(default_factory=dict)  # the pipeline's own settings (`family.pipeline_settings`)
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    tokenizer_3: Any = None
    text_encoder_3: Any = None

    @property
    def tokenizers(self) -> list:
        return [getattr(self, name) for name in self.family.tokenizers]

    @property
    def text_encoders(self) -> list:
        return [getattr(self, name) for name in self.family.text_encoders]


def load_text_encoders(family: Family, name_or_path: str, revision: str | None = None, variant: str | None = None,
                       torch_dtype: torch.dtype | None = None, keep_full_precision: Collection[str] = ()) -> list:
    """The family's text encoders of a checkpoint, in `family.text_encoders` order, in `torch_dtype` (default fp32)
    but those named in `keep_full_precision`, in fp32 whatever the checkpoint stores (transformers would otherwise
    keep a bf16 checkpoint's dtype)."""
    import transformers

    return [load(getattr(transformers, encoder_class), name_or_path, "text encoder", subfolder=encoder,
                 revision=revision, variant=variant,
                 dtype=torch_dtype if torch_dtype is not None and encoder not in keep_full_precision else torch.float32)
            for encoder, encoder_class in zip(family.text_encoders, family.text_encoder_classes)]


def free_device_memory() -> None:
    """Return freed tensors' memory to the device (after dropping modules)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_sd_components(name_or_path: str, revision: str | None = None, variant: str | None = None,
                       vae_name_or_path: str = "", frozen_dtype: torch.dtype | None = None,
                       keep_full_precision: Collection[str] = ()) -> SDComponents:
    """Tokenizers, text encoders, VAE, denoiser and the training scheduler from one checkpoint of any family
    (`vae_name_or_path`: another VAE, e.g. an fp16-safe one for SDXL).

    `frozen_dtype`: the text encoders and the denoiser are loaded straight in this dtype, but those named in
    `keep_full_precision` (component names; "denoiser" for the family's), which are loaded in fp32: what trains, or
    what trained weights start from. A frozen part is then never held in fp32 on the host (FLUX.1's transformer and
    T5 are 62 GiB in fp32, per process, before a cast)."""
    import diffusers
    import transformers
    check_model_path(name_or_path)
    index = model_index(name_or_path, revision)
    family = family_of_class(index.get("_class_name", ""), name_or_path)
    common = {"revision": revision}
    parts: dict[str, Any] = dict(zip(family.text_encoders, load_text_encoders(
        family, name_or_path, revision, variant, frozen_dtype, keep_full_precision)))
    denoiser_dtype = torch.float32 if frozen_dtype is None or "denoiser" in keep_full_precision else frozen_dtype
    for tokenizer, tokenizer_class in zip(family.tokenizers, family.tokenizer_classes):
        parts[tokenizer] = load(getattr(transformers, tokenizer_class), name_or_path, "tokenizer", subfolder=tokenizer,
                                **common)
    vae = (load_other_vae(family, vae_name_or_path, name_or_path, revision) if vae_name_or_path
           else load(getattr(diffusers, family.vae_class), name_or_path, "VAE", subfolder="vae", variant=variant, **common))
    return SDComponents(
        vae=vae, family=family, **parts, settings=pipeline_settings(index),
        denoiser=load(getattr(diffusers, family.denoiser_class), name_or_path, family.denoiser, subfolder=family.denoiser,
                      variant=variant, dtype=denoiser_dtype, **common),
        noise_scheduler=load(getattr(diffusers, family.training_scheduler), name_or_path, "scheduler",
                             subfolder="scheduler", **common),
    )


def load_other_vae(family: Family, vae_name_or_path: str, base: str, revision: str | None = None, **kwargs: Any):
    """`--pretrained_vae_model_name_or_path` for `base` (e.g. an fp16-safe SDXL VAE); one of latents of another shape
    than the base's own VAE (another family's) is one line, before training (it was a traceback at the first step)."""
    import diffusers

    vae_class = getattr(diffusers, family.vae_class)
    vae = load(vae_class, vae_name_or_path, "VAE", **kwargs)
    own = vae_class.load_config(base, subfolder="vae", revision=revision).get("latent_channels")
    if vae.config.latent_channels != own:
        raise UserError(f"--pretrained_vae_model_name_or_path {vae_name_or_path} makes {vae.config.latent_channels}-channel "
                        f"latents, {base}'s own VAE {own}: a VAE of another model family")
    return vae


def load_pipeline(family: Family, name_or_path: str, controlnet=None, safety_checker: bool = False, **kwargs):
    """`from_pretrained` of the family's pipeline (with a ControlNet, if given), one-line errors; SD's safety
    checker only if asked (it blackens sketches)."""
    if family.safety_checker and not safety_checker:
        kwargs = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
    if controlnet is not None:
        kwargs["controlnet"] = controlnet
    return load(pipeline_class(family, controlnet is not None), name_or_path, "model", **kwargs)


def load_base_pipeline(family: Family, name_or_path: str, revision: str | None = None, variant: str | None = None,
                       vae_name_or_path: str = "", torch_dtype: torch.dtype = torch.float32, controlnet=None,
                       safety_checker: bool = False):
    """The base pipeline of a run (its class images, the pipeline its trained weights are saved into or generate
    from): with the VAE the run trains and validates with (`vae_name_or_path`), every component in `torch_dtype`
    whatever `variant` holds: an fp16 variant's text encoder saved beside fp32 trained weights stops plain diffusers
    at the first prompt ("mat1 and mat2 must have the same dtype")."""

    kwargs = {}
    if vae_name_or_path:
        kwargs["vae"] = load_other_vae(family, vae_name_or_path, name_or_path, revision, dtype=torch_dtype)
    return load_pipeline(family, name_or_path, controlnet, safety_checker, revision=revision, variant=variant,
                         dtype=torch_dtype, **kwargs)


def assemble_pipeline(components, denoiser, text_encoder, scheduler, controlnet=None):
    """A generation pipeline of the components' family around the given (trained) denoiser and first text encoder."""
    family = components.family
    parts = {"vae": components.vae, family.denoiser: denoiser, "scheduler": scheduler,
             **{name: getattr(components, name) for name in (*family.text_encoders, *family.tokenizers)},
             "text_encoder": text_encoder, **({"controlnet": controlnet} if controlnet is not None else {})}
    if family.safety_checker:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = pipeline_class(family, controlnet is not None)
    accepted = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in components.settings.items() if k in accepted and k not in parts}
    return cls(**parts, **settings)


def enable_xformers(model: Any, device: torch.device) -> None:
    """xformers attention for a UNet or pipeline, or one clear line why not (off CUDA, not installed, or
    built for another torch: each xformers release is built for one torch version; see README)."""
    if device.type != "cuda":
        raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA device (xformers has no CPU kernels); "
                        "leave it off to use PyTorch SDPA, the default")
    try:
        model.enable_xformers_memory_efficient_attention()
    except Exception as err:  # missing, or its C++/CUDA extensions built for another torch
        raise UserError(f"xformers attention unavailable: {str(err).strip().splitlines()[0]} "
                        "(install the xformers release built for your torch, see README; SDPA is the default)") from err


def requested_precision(mixed_precision: str | None) -> str:
    """`--mixed_precision` if given, else what accelerate was configured with (config file, `accelerate launch
    --mixed_precision`, ACCELERATE_MIXED_PRECISION), else "no" — as diffusers' scripts do; one line for another value.
    Every script's rule: the trainers', generation's and captioning's."""
    precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "fp16", "bf16"):
        raise UserError(f"mixed precision must be no, fp16 or bf16, got {precision!r}")
    return precision


def check_precision_fits(mixed_precision: str, device: torch.device) -> None:
    """fp16 inference without CUDA is one line (CPUs run fp16 matmuls slowly or not at all)."""
    if device.type != "cuda" and mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16 needs a CUDA device; use bf16 or no on CPU")


def dtype_for(mixed_precision: str) -> torch.dtype:
    """The weight dtype of frozen modules for a `--mixed_precision` value."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def save_pretrained_atomic(obj: Any, out: str | os.PathLike) -> None:
    """`obj.save_pretrained` (a pipeline or a model) into `out`; a kill never leaves one that loads half-written.

    Files go to a temp folder inside `out` and are moved in, model_index.json last.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".pipeline-") as tmp:
        obj.save_pretrained(tmp, safe_serialization=True)
        umask_modes(tmp)
        for entry in sorted(Path(tmp).iterdir(), key=lambda p: p.name == "model_index.json"):
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(entry), str(target))
