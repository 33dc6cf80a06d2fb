"""GPU memory of the training recipes at full size, from one measured step (CPU is enough).

Measured: the peak tensor memory of one bf16 UNet training step (batch 1, gradient checkpointing, LoRA r=8 so the
backward runs through the whole frozen UNet) on the full architecture with random weights, tracked tensor by tensor
(`torch.distributed._tools.mem_tracker.MemTracker`, which counts what a GPU allocator must hold, not process RSS).
Computed: each recipe's model states from exact parameter counts (bytes per parameter below) plus the measured
activations and temporaries. A GPU adds allocator fragmentation and CUDA context (~1-2 GiB); `bench/gpu_acceptance.py`
measures the real thing when a GPU is at hand.

    python bench/memory_recipes.py --size sdxl --resolution 1024     # ~4 min and ~8 GiB RAM on 2 cores
"""

from __future__ import annotations

import argparse
import time

import torch

GIB = 2**30


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tracker():
    """MemTracker that does not hook frozen parameters (it tries to, and fails, on tensors without grad)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAware(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # noqa: ARG002
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return FrozenAware()


def measure_step(size: str, resolution: int) -> dict[str, float]:
    """Peak tensor bytes of one LoRA training step of the UNet of `size`, split into the frozen weights and the rest."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sketch2real.testing.tiny import SD_SIZES
    from sketch2real.training.dreambooth import LORA_TARGETS

    shapes = SD_SIZES[size]["unet"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build the frozen base directly in bf16, as training holds it
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **shapes)
    torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters in fp32, as the trainer casts them
    unet.enable_gradient_checkpointing()
    unet.train()
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, dtype=torch.bfloat16)
    states = torch.randn(1, 77, shapes["cross_attention_dim"], dtype=torch.bfloat16)
    added = None
    if shapes.get("addition_embed_type") == "text_time":
        pooled = shapes["projection_class_embeddings_input_dim"] - 6 * shapes["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(1, pooled, dtype=torch.bfloat16),
                 "time_ids": torch.tensor([[256, 256, 0, 0, resolution, resolution]], dtype=torch.bfloat16)}
    tracker = _tracker()
    tracker.track_external(unet)
    start = time.perf_counter()
    with tracker, torch.autocast("cpu", torch.bfloat16):
        prediction = unet(latents, torch.tensor([500]), states, added_cond_kwargs=added).sample
        prediction.float().pow(2).mean().backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    frozen = sum(p.numel() * p.element_size() for p in unet.parameters() if not p.requires_grad)
    return {"peak": peak["Total"], "frozen_weights": frozen, "step_rest": peak["Total"] - frozen,
            "lora_params": sum(p.numel() for p in unet.parameters() if p.requires_grad), "seconds": time.perf_counter() - start}


def parameter_counts(size: str) -> dict[str, int]:
    """Parameters of the UNet, the other frozen parts (text encoders, VAE) and a ControlNet, built on the meta device."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sketch2real.testing.tiny import SD_SIZES

    shapes = SD_SIZES[size]
    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **shapes["unet"])
        levels = len(shapes["vae"]["block_out_channels"])
        vae = AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, **shapes["vae"])
        text = [cls(CLIPTextConfig(vocab_size=49408, **shapes[k]))
                for cls, k in ((CLIPTextModel, "text"), (CLIPTextModelWithProjection, "text_2")) if k in shapes]
        controlnet = ControlNetModel.from_unet(unet)
    return {"unet": count(unet), "text_encoders": sum(count(t) for t in text), "vae": count(vae),
            "controlnet": count(controlnet)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="sdxl", help="sd15 or sdxl")
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    n = parameter_counts(args.size)
    step = measure_step(args.size, args.resolution)
    act = step["step_rest"] - 8 * step["lora_params"]  # activations and temporaries (less the adapters and their grads)
    frozen_rest = 2 * (n["text_encoders"] + n["vae"])  # text encoders and VAE held in bf16
    u, t, c = n["unet"], n["text_encoders"], n["controlnet"]
    # bytes per trained parameter: fp32 weight 4 + fp32 grad 4 + AdamW 8 (8-bit AdamW: 2), plus the bf16 copy autocast
    # keeps of every fp32 weight during the step (2); DeepSpeed bf16: the bf16 module 2 + its share of the 18 bytes of
    # grads, fp32 masters and Adam states (ZeRO-2), or only 2 with the optimizer offloaded to CPU (DeepSpeed's estimate).
    recipes = {
        "LoRA r=8 + gradient checkpointing": 2 * u + 16 * step["lora_params"],
        "full UNet, AdamW + checkpointing": (16 + 2) * u,
        "full UNet, 8-bit AdamW + checkpointing": (10 + 2) * u,
        "full UNet + both text encoders, 8-bit AdamW + checkpointing": (10 + 2) * (u + t) - 2 * t,
        "full UNet, ZeRO-2 over 8 GPUs + checkpointing": 2 * u + 18 * u / 8,
        "full UNet, ZeRO-2 optimizer offload to CPU + checkpointing": 2 * u,
        "ControlNet, 8-bit AdamW + checkpointing": 2 * u + (10 + 2) * c,
    }
    print(f"{args.size} at {args.resolution} px, batch 1, bf16: UNet {u / 1e9:.3f}B, text encoders {t / 1e9:.3f}B, "
          f"VAE {n['vae'] / 1e6:.0f}M, ControlNet {c / 1e9:.3f}B parameters")
    print(f"measured LoRA step ({step['seconds']:.0f} s on CPU): peak {step['peak'] / GIB:.2f} GiB of tensors, of which "
          f"activations and temporaries {act / GIB:.2f} GiB")
    print("| recipe | model states GiB | + frozen encoders/VAE | + activations | total GiB | fits |\n|---|---:|---:|---:|---:|---|")
    for name, states in recipes.items():
        total = states + frozen_rest + act
        fits = next((f"{card} GB" for card in (24, 40, 80) if total / GIB < 0.92 * card), "> 80 GB")  # 8% for CUDA
        print(f"| {name} | {states / GIB:.1f} | {frozen_rest / GIB:.1f} | {act / GIB:.1f} | {total / GIB:.1f} | {fits} |")


if __name__ == "__main__":
    main()
