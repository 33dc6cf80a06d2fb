"""A tiny Stable Diffusion that has learned something: trained on CPU in a few minutes on a synthetic Sketchy.

Photos are captioned "a photo of a {category}", sketches "a sketch of a {category}". First the VAE learns to
reconstruct them (L1 + a small KL; factor-4 latents, 16x16x4 at 64 px), then the UNet and text encoder learn
text-to-image on those latents (epsilon prediction, 10% empty prompts so classifier-free guidance works).
The result is an ordinary diffusers `StableDiffusionPipeline` folder. Seeded; a rerun with the same settings
finds `pretrain.json` and returns at once.

CLI: `python -m sketch2real.testing.build --pretrain --output_dir DIR` writes DIR/tiny-sd-trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sketch2real.synthetic import DEFAULT_CATEGORIES
from sketch2real.testing.tiny import build_text_encoder, build_unet, build_vae, clip_tokenizer

logger = logging.getLogger("sketch2real")

PRETRAINED_DIRNAME = "tiny-sd-trained"
SHAPES = "tiny_trained"  # its entry of sketch2real.testing.tiny.SD_SIZES


@dataclass
class PretrainSettings:
    """What the tiny base is trained on and for how long (part of the cache key)."""

    resolution: int = 64
    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    photos_per_category: int = 48
    sketches_per_photo: int = 2
    vae_steps: int = 400
    unet_steps: int = 1000
    batch_size: int = 32
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    unet_learning_rate: float = 2e-3
    snr_gamma: float = 5.0  # Min-SNR weighting: converges several times faster (Hang et al. 2023)
    ema_decay: float = 0.995  # the saved UNet and text encoder are exponential moving averages
    kl_weight: float = 1e-4
    empty_prompt_fraction: float = 0.1
    data_seed: int = 12345  # not the demo's or the tests' release seed: no test image is seen in pretraining
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _training_set(settings: PretrainSettings, work: Path) -> tuple[torch.Tensor, list[str]]:
    """Every photo and sketch of a fresh synthetic release at the training resolution, with its caption."""
    from sketch2real.shards import decode_image
    from sketch2real.sketchy import DEFAULT_AUGMENTATION, RENDERED, category_words
    from sketch2real.synthetic import make_synthetic_sketchy

    make_synthetic_sketchy(work, settings.categories, settings.photos_per_category, settings.sketches_per_photo,
                           test_photos_per_category=0, invalid_fraction=0.0, seed=settings.data_seed)
    images, captions = [], []
    for kind in ("photo", "sketch"):
        for i, path in enumerate(sorted((work / RENDERED / kind / DEFAULT_AUGMENTATION).rglob("*.*"))):
            images.append(decode_image(path.read_bytes(), settings.resolution, True))
            words = category_words(path.parent.name)
            # "an apple" as people write it, and "a apple" as templates like "a photo of a {category}" give it
            article = "an" if i % 2 and words[0] in "aeiou" else "a"
            captions.append(f"a {kind} of {article} {words}")
    return torch.stack(images), captions


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def pretrain_tiny_sd(output_dir: str | Path, settings: PretrainSettings | None = None, progress: bool = True) -> Path:
    """Train the tiny base (VAE, then UNet + text encoder) and save it at `output_dir`; cached by settings."""
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    from sketch2real.io import write_json
    from sketch2real.models import save_pretrained_atomic
    from sketch2real.training.diffusion import DenoisingObjective, tokenize

    settings = settings or PretrainSettings()
    out = Path(output_dir)
    record = out / "pretrain.json"
    if record.is_file() and json.loads(record.read_text()).get("key") == settings.key():
        return out
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    with tempfile.TemporaryDirectory() as tmp:
        images, captions = _training_set(settings, Path(tmp) / "sketchy")
        tokenizer = clip_tokenizer(Path(tmp) / "vocab")
    n_holdout = max(8, len(images) // 10)  # a seeded held-out tenth measures what was learned
    order = torch.randperm(len(images), generator=generator)
    held, train = order[:n_holdout], order[n_holdout:]

    # 1. The VAE: reconstruction (L1) + a small KL, then the scaling factor that gives unit-variance latents.
    vae = build_vae(SHAPES, sample_size=settings.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.vae_learning_rate, total_steps=settings.vae_steps,
                                                   pct_start=0.05)
    for rows in tqdm(_batches(len(train), settings.vae_batch_size, settings.vae_steps, generator), total=settings.vae_steps,
                     desc="tiny base: VAE", disable=not progress):
        x = images[train[rows]]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (reconstruction - x).abs().mean() + settings.kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
        scaling = float(1 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        held_recon = vae.decode(means[held]).sample
        reconstruction_error = float((held_recon - images[held]).abs().mean())
        latents = means * scaling

    # 2. UNet + text encoder on the latents (epsilon prediction, SD 1.x's noise schedule).
    side = settings.resolution // 4
    unet = build_unet(SHAPES, sample_size=side)
    text_encoder = build_text_encoder(SHAPES, tokenizer)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])

    def denoising_loss(rows: torch.Tensor, g: torch.Generator, drop: bool, snr_gamma: float = 0.0) -> torch.Tensor:
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(rows),), generator=g)
        prompt_ids = ids[rows]
        if drop:
            dropped = torch.rand(len(rows), generator=g) < settings.empty_prompt_fraction
            prompt_ids = torch.where(dropped[:, None], empty, prompt_ids)
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, text_encoder(prompt_ids)[0]).sample
        return DenoisingObjective(noise_scheduler, snr_gamma).loss(prediction, noise, t).mean()

    def heldout_loss() -> float:
        with torch.no_grad():
            return float(denoising_loss(held, torch.Generator().manual_seed(7), drop=False))

    random_base_loss = heldout_loss()
    params = [*unet.parameters(), *text_encoder.parameters()]
    averages = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=settings.unet_learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.unet_learning_rate, total_steps=settings.unet_steps,
                                                   pct_start=0.05)
    for rows in tqdm(_batches(len(train), settings.batch_size, settings.unet_steps, generator), total=settings.unet_steps,
                     desc="tiny base: UNet", disable=not progress):
        loss = denoising_loss(train[rows], generator, drop=True, snr_gamma=settings.snr_gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(averages, [p.detach() for p in params], 1 - settings.ema_decay)
    with torch.no_grad():
        for p, average in zip(params, averages):
            p.copy_(average)
    unet.eval()
    text_encoder.eval()
    trained_loss = heldout_loss()

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    save_pretrained_atomic(pipe, out)
    summary = {
        "key": settings.key(), "settings": asdict(settings), "training_images": len(train), "heldout_images": len(held),
        "heldout_reconstruction_l1": reconstruction_error, "heldout_denoising_loss": trained_loss,
        "random_base_heldout_denoising_loss": random_base_loss, "seconds": round(time.perf_counter() - start, 1),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                       (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))},
    }
    write_json(record, summary)
    logger.info("tiny base trained in %.0f s: held-out denoising loss %.4f (random base %.4f), reconstruction L1 %.4f",
                summary["seconds"], trained_loss, random_base_loss, reconstruction_error)
    return out
