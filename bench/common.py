"""Fixtures for benchmarks: tiny models, a synthetic release, its splits and shards in one temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, photos_per_category: int = 8) -> dict[str, Path]:
    from sketch2real.shards import write_shards
    from sketch2real.sketchy import SketchyRelease
    from sketch2real.splits import build_splits, write_splits
    from sketch2real.synthetic import make_synthetic_sketchy
    from sketch2real.testing.tiny import build_all

    models = build_all(root / "tiny")
    os.environ["TORCH_HOME"] = str(models.torch_home)
    make_synthetic_sketchy(root / "sketchy", photos_per_category=photos_per_category, size=64)
    write_splits(build_splits(SketchyRelease(root / "sketchy")), root / "splits")
    write_shards(root / "splits", root / "sketchy", root / "shards", progress=False)
    return {"sd": models.sd, "blip2": models.blip2, "llava": models.llava, "shards": root / "shards"}


def run(script: str, *args, launch_processes: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if launch_processes:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs/cpu.yaml"),
               "--num_processes", str(launch_processes), str(REPO / script)]
    else:
        cmd = [sys.executable, str(REPO / script)]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, check=True)


# Dense bf16 peak of common training GPUs, FLOP/s (vendor figures, no sparsity); the first name found in the device's
# name as whole words counts, so the variants come before their family (an H100 PCIe is not an SXM H100).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
             "L40": 181e12, "A6000": 155e12, "L4": 121e12}


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (`torch.cuda.get_device_name`), or None for one not in PEAK_BF16."""
    import re

    return next((peak for key, peak in PEAK_BF16.items() if re.search(rf"\b{re.escape(key)}\b", device_name)), None)


def device_peak_flops() -> float | None:
    """The CUDA device's dense bf16 peak, or None (CPU, or a GPU not in PEAK_BF16)."""
    import torch

    return peak_bf16(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def training_flops_per_sample(model_dir: Path, resolution: int, trains: str = "unet", controlnet: bool = False,
                              lora_rank: int = 8) -> float:
    """FLOPs of one training sample's forward and backward as they run, counted by torch (FlopCounterMode) on meta
    tensors (no compute, any size): the UNet (SD 1.x or SDXL) with gradients for its weights (`trains="unet"`), for
    LoRA adapters only ("lora": the backward computes activation gradients and the adapters'), for the text
    encoder's token embedding only ("embeddings": Textual Inversion; the text encoder's forward and backward count
    too), or for the UNet and the whole text encoder ("unet_and_text_encoder": DreamBooth --train_text_encoder); with `controlnet`, a ControlNet made from the UNet, trained, and the UNet frozen. The VAE is left out
    (latents are cached); recomputation by gradient checkpointing is not counted (model FLOPs)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from sketch2real.family import FAMILIES

    if (Path(model_dir) / "transformer").is_dir():
        return flow_lora_flops_per_sample(Path(model_dir), resolution)
    unet_config = UNet2DConditionModel.load_config(model_dir, subfolder="unet")
    text_config = CLIPTextConfig.from_pretrained(model_dir, subfolder="text_encoder")
    side, tokens = resolution // 8, text_config.max_position_embeddings
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(
            trains in ("unet", "unet_and_text_encoder") and not controlnet)
        if trains == "lora":
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=lora_rank, target_modules=FAMILIES["sd"].lora_targets(unet)))
        states = torch.randn(1, tokens, unet_config["cross_attention_dim"])
        if trains in ("embeddings", "unet_and_text_encoder"):
            encoder = CLIPTextModel(text_config).requires_grad_(trains == "unet_and_text_encoder")
            encoder.get_input_embeddings().weight.requires_grad_(True)
            hidden = encoder(torch.zeros(1, tokens, dtype=torch.long))[0]
            states = hidden.repeat(1, 1, unet_config["cross_attention_dim"] // hidden.shape[-1])  # SDXL: 2 encoders wide
        added = {}
        if unet_config.get("addition_embed_type") == "text_time":
            pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}}
        latents, timestep = torch.randn(1, 4, side, side), torch.tensor([500])
        control = {}
        if controlnet:
            net = ControlNetModel.from_unet(unet).requires_grad_(True)
            down, mid = net(latents, timestep, states, controlnet_cond=torch.randn(1, 3, resolution, resolution),
                            return_dict=False, **added)
            control = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        out = unet(latents, timestep, states, return_dict=False, **added, **control)[0]
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def fake_tensors(module: torch.nn.Module) -> torch.nn.Module:
    """Replace `module`'s (meta) parameters and buffers by CPU tensors of the active `FakeTensorMode`, same shapes,
    dtypes and requires_grad."""
    import torch

    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"), p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            setattr(sub, name, torch.empty(b.shape, dtype=b.dtype, device="cpu"))
    return module


def flow_lora_flops_per_sample(model_dir: Path, resolution: int, rank: int = 16) -> float:
    """FLOPs of one LoRA training sample's forward and backward through a flow-matching transformer (FLUX.1), as the
    trainer calls it (the family's `predict`: latents packed, position ids, guidance), counted by torch on meta
    tensors: the VAE's latents at `resolution`, the family's prompt length of text states, adapters of `rank` on its
    LoRA layers. Model FLOPs: gradient checkpointing's recomputation is not counted."""
    import diffusers
    import torch
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sketch2real.device import device_constant
    from sketch2real.family import Conditioning, family_of

    family = family_of(str(model_dir))
    denoiser_class = getattr(diffusers, family.denoiser_class)
    config = denoiser_class.load_config(model_dir, subfolder=family.denoiser)
    vae = getattr(diffusers, family.vae_class).load_config(model_dir, subfolder="vae")
    side, tokens = resolution // 8, family.max_sequence_length
    with torch.device("meta"):
        denoiser = denoiser_class.from_config(config).requires_grad_(False)
        denoiser.add_adapter(LoraConfig(r=rank, target_modules=family.lora_targets(denoiser)))
    # fake CPU tensors (shapes, no storage): `predict` makes position ids on the CPU, which meta inputs refuse; its
    # cached per-device constants are cleared on both sides (a fake one kept would fail the next real step, and a
    # real one kept, this count)
    device_constant.cache_clear()
    try:  # SDPA's math kernel: on CPU its flash kernel is one op FlopCounterMode does not count (attention left out)
        with FakeTensorMode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fake_tensors(denoiser)
            noisy = torch.randn(1, vae["latent_channels"], side, side)
            pooled = torch.randn(1, config["pooled_projection_dim"]) if config.get("pooled_projection_dim") else None
            text = Conditioning(torch.randn(1, tokens, config["joint_attention_dim"]), pooled)
            out = family.predict(denoiser, noisy, torch.full((1,), 500.0), text, guidance=3.5)
            out.float().pow(2).mean().backward()
    finally:
        device_constant.cache_clear()
    return float(counter.get_total_flops())
