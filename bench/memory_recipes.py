"""GPU memory of the training recipes at full size, from one measured step (CPU is enough).

Measured: the peak tensor memory of one bf16 UNet training step (batch 1, gradient checkpointing, LoRA r=8 so the
backward runs through the whole frozen UNet) on the full architecture with random weights, tracked tensor by tensor
(`torch.distributed._tools.mem_tracker.MemTracker`, which counts what a GPU allocator must hold, not process RSS).
Computed: each recipe's model states from exact parameter counts (bytes per parameter below) plus the measured
activations and temporaries. A GPU adds allocator fragmentation and CUDA context (~1-2 GiB); `bench/gpu_acceptance.py`
measures the real thing when a GPU is at hand.

    python bench/memory_recipes.py --size sdxl --resolution 1024     # ~4 min and ~8 GiB RAM on 2 cores

FLUX.1 [dev] (`--size flux`) and FLUX.2 [klein] 4B (`--size klein`), LoRA r=16 on the family's `lora_targets`,
gradient checkpointing, 512 and 1024 px, the transformer called as the family's `predict` calls it: FLUX.1's 12B
transformer is 22 GiB in bf16, more than a 24 GiB CPU box holds, and bf16 matmuls on a CPU without native bf16 (AVX2
only) run at ~1 GFLOP/s, so the step runs on fake tensors (`FakeTensorMode`: real shapes, dtypes and kernel choice, no
storage, no arithmetic) under the same MemTracker, which then tracks the same bytes as with real tensors (`--real`
checks it). Parameters are counted on the meta device. The step's memory beyond the frozen weights is measured at full
width and reduced depth, (double, single) blocks in FIT_DEPTHS, fit as a + b_d * double + b_s * single, extrapolated
to the full depth (FLUX.1 19 + 38, klein 5 + 20 blocks) and, with fake tensors, also measured at full depth (the tables
use that measurement; the fit shows how close the extrapolation comes).

    python bench/memory_recipes.py --size flux                       # 512 and 1024 px; ~2 min, ~1 GiB RAM
    python bench/memory_recipes.py --size flux --real --resolution 64 --text_tokens 16 --depths 1,1   # real, ~2 min
    python bench/memory_recipes.py --size klein                      # 512 and 1024 px; ~25 s, ~1 GiB RAM
    python bench/memory_recipes.py --size klein --real --resolution 64 --text_tokens 16 --depths 1,1  # real, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import fake_tensors

from sketch2real.testing.tiny import SD_SIZES

GIB = 2**30


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tracker(peak_only: bool = False):
    """MemTracker that does not hook frozen parameters (it tries to, and fails, on tensors without grad). `peak_only`:
    keep the global peak only, not every module's (a pass over all modules at every op: quadratic in depth)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAware(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # noqa: ARG002
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        def _update_peak_stats(self, peak_state) -> None:
            if not peak_only:
                return super()._update_peak_stats(peak_state)
            for device, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snap["Total"]:
                    self._peak_mem[device], self._peak_mem_snap[device] = snap["Total"], dict(snap)

    return FrozenAware()


def measure_step(size: str, resolution: int) -> dict[str, float]:
    """Peak tensor bytes of one LoRA training step of the UNet of `size`, split into the frozen weights and the rest."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sketch2real.family import FAMILIES
    shapes = SD_SIZES[size]["unet"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build the frozen base directly in bf16, as training holds it
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **shapes)
    torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    targets = FAMILIES["sdxl" if size == "sdxl" else "sd"].lora_targets(unet)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
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


def report_sd(args: argparse.Namespace) -> None:
    """The Stable Diffusion (sd15, sdxl) recipes: one measured UNet LoRA step at `args.resolution` (1024 if not given)."""
    args.resolution = args.resolution or 1024
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
        "full UNet + both text encoders, 8-bit AdamW + checkpointing": (10 + 2) * (u + t),
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
        frozen = 2 * n["vae"] if "text encoders" in name else frozen_rest  # trained encoders are in the states
        total = states + frozen + act
        fits = next((f"{card} GB" for card in (24, 40, 80) if total / GIB < 0.92 * card), "> 80 GB")  # 8% for CUDA
        print(f"| {name} | {states / GIB:.1f} | {frozen / GIB:.1f} | {act / GIB:.1f} | {total / GIB:.1f} | {fits} |")


# ---- flow-matching transformers: FLUX.1 [dev] 12B, FLUX.2 [klein] 4B --------------------------------------------------
# black-forest-labs/FLUX.1-dev's configs: transformer, text_encoder (CLIP-L), text_encoder_2 (T5-XXL encoder), vae
# (the shapes are the library's SD_SIZES["flux_dev"], which bench/gpu_speed.py builds; the vocabularies are the models')
FLUX_TRANSFORMER = SD_SIZES["flux_dev"]["transformer"]
FLUX_CLIP = {"vocab_size": 49408, "max_position_embeddings": 77, **SD_SIZES["flux_dev"]["text"]}
FLUX_T5 = {"vocab_size": 32128, **SD_SIZES["flux_dev"]["t5"]}
FLUX_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, **SD_SIZES["flux_dev"]["vae"]}
# black-forest-labs/FLUX.2-klein-4B's configs: transformer, text_encoder (Qwen3-4B); its vae is AutoencoderKLFlux2's defaults
KLEIN_TRANSFORMER = {"patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
                     "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256,
                     "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "guidance_embeds": False}
KLEIN_QWEN3 = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
               "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
               "max_position_embeddings": 40960}
KLEIN_LATENT_CHANNELS = 32  # AutoencoderKLFlux2's latent_channels; `predict` patchifies them 2x2 into the transformer's 128
LORA_RANK = 16
FIT_DEPTHS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (double, single) blocks measured for the depth fit
GPUS = 8  # the ZeRO-3 recipes' data-parallel size
CARDS_GB = (24, 40, 80)
HEADROOM = 2 * GIB  # CUDA context and allocator fragmentation, left free on every card


def flux_frozen_parts() -> dict[str, torch.nn.Module]:
    """FLUX.1 [dev]'s frozen parts beside the transformer, on the meta device (T5, which DreamBooth releases, first)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {"T5-XXL encoder": T5EncoderModel(T5Config(**FLUX_T5)), "CLIP-L": CLIPTextModel(CLIPTextConfig(**FLUX_CLIP)),
                "VAE": AutoencoderKL(**FLUX_VAE)}


def klein_frozen_parts() -> dict[str, torch.nn.Module]:
    """FLUX.2 [klein] 4B's frozen parts beside the transformer, on the meta device (Qwen3, which DreamBooth releases,
    first; its LM head is tied to the embedding, counted once)."""
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        return {"Qwen3-4B": Qwen3ForCausalLM(Qwen3Config(**KLEIN_QWEN3)), "VAE": AutoencoderKLFlux2()}


def flux_inputs(resolution: int, text_tokens: int) -> dict:
    """The transformer's arguments for a batch of 1 as `FluxFamily.predict` builds them: the 16-channel latents
    (resolution / 8) packed 2x2 into (resolution / 16)^2 tokens with their position ids, T5 states of `text_tokens`
    tokens, CLIP's pooled embedding, t / 1000 and the guidance value, in bf16 as the trainer's encoders give them."""
    from diffusers import FluxPipeline

    side, width = resolution // 8, FLUX_TRANSFORMER["joint_attention_dim"]
    noisy = torch.randn(1, 16, side, side, dtype=torch.bfloat16)
    return {"hidden_states": FluxPipeline._pack_latents(noisy, 1, 16, side, side),
            "img_ids": FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, noisy.device, noisy.dtype),
            "encoder_hidden_states": torch.randn(1, text_tokens, width, dtype=torch.bfloat16),
            "txt_ids": torch.zeros(text_tokens, 3, dtype=torch.bfloat16),
            "pooled_projections": torch.randn(1, FLUX_TRANSFORMER["pooled_projection_dim"], dtype=torch.bfloat16),
            "timestep": torch.full((1,), 0.5), "guidance": torch.full((1,), 3.5), "return_dict": False}


def flux_forward(transformer: torch.nn.Module, resolution: int, text_tokens: int) -> torch.Tensor:
    """FLUX.1's prediction for a batch of 1 (`flux_inputs`)."""
    return transformer(**flux_inputs(resolution, text_tokens))[0]


def klein_forward(transformer: torch.nn.Module, resolution: int, text_tokens: int) -> torch.Tensor:
    """FLUX.2 [klein]'s prediction for a batch of 1 through the trainer's own `Flux2KleinFamily.predict` (patchify,
    pack, latent and text position ids, t / 1000, no guidance): 32-channel latents (resolution / 8), Qwen3's states
    of layers 9, 18, 27 side by side (`text_tokens` x 7680), in bf16 as the trainer's encoder gives them."""
    from sketch2real.family import FAMILIES, Conditioning

    side, width = resolution // 8, KLEIN_TRANSFORMER["joint_attention_dim"]
    noisy = torch.randn(1, KLEIN_LATENT_CHANNELS, side, side, dtype=torch.bfloat16)
    states = torch.randn(1, text_tokens, width, dtype=torch.bfloat16)
    return FAMILIES["flux2-klein"].predict(transformer, noisy, torch.full((1,), 500.0), Conditioning(states))


@dataclass(frozen=True)
class FlowModel:
    """What a `--size` of a flow-matching transformer measures: its transformer (diffusers class and config), its
    family (LoRA targets, prompt tokens), its other frozen parts and how the trainer calls the transformer."""

    title: str
    family: str  # the `sketch2real.family.FAMILIES` entry
    transformer_class: str
    transformer: dict[str, Any]
    frozen_parts: Callable[[], dict[str, torch.nn.Module]]  # on the meta device; the first is released by DreamBooth
    released: str  # the short name of that first part, for the columns
    forward: Callable[[torch.nn.Module, int, int], torch.Tensor]  # (transformer, resolution, text tokens) -> prediction

    @property
    def depth(self) -> tuple[int, int]:
        """The full model's (double, single) blocks."""
        return self.transformer["num_layers"], self.transformer["num_single_layers"]

    @property
    def text_tokens(self) -> int:
        from sketch2real.family import FAMILIES

        return FAMILIES[self.family].max_sequence_length


FLOW_MODELS = {
    "flux": FlowModel("FLUX.1 [dev]", "flux", "FluxTransformer2DModel", FLUX_TRANSFORMER, flux_frozen_parts, "T5",
                      flux_forward),
    "klein": FlowModel("FLUX.2 [klein] 4B", "flux2-klein", "Flux2Transformer2DModel", KLEIN_TRANSFORMER,
                       klein_frozen_parts, "Qwen3", klein_forward),
}


def flow_transformer(model: FlowModel, double: int, single: int, meta: bool) -> torch.nn.Module:
    """`model`'s transformer at full width with `double` and `single` blocks, set up as the DreamBooth trainer does
    for LoRA: frozen base in bf16, adapters (r=16, the family's `lora_targets`) in fp32, gradient checkpointing on.
    Random weights, or parameters on the meta device (`meta`)."""
    import diffusers
    from peft import LoraConfig

    from sketch2real.family import FAMILIES

    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        torch.set_default_dtype(torch.bfloat16)  # the frozen base built directly in bf16, as training holds it
        try:
            transformer = getattr(diffusers, model.transformer_class)(
                **{**model.transformer, "num_layers": double, "num_single_layers": single})
        finally:
            torch.set_default_dtype(torch.float32)
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                           target_modules=FAMILIES[model.family].lora_targets(transformer)))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters in fp32, as the trainer casts them
    transformer.enable_gradient_checkpointing()
    return transformer.train()


def measure_flow_step(model: FlowModel, double: int, single: int, resolution: int, text_tokens: int,
                      real: bool) -> dict[str, float]:
    """Peak tracked bytes of one bf16 LoRA step (forward, loss, backward) of `model`'s transformer with (double,
    single) blocks; `rest`: the peak beyond the frozen weights (adapters, their gradients, activations, temporaries)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    transformer = flow_transformer(model, double, single, meta=not real)
    with contextlib.nullcontext() if real else FakeTensorMode():
        if not real:
            fake_tensors(transformer)
        tracker = _tracker(peak_only=True)
        tracker.track_external(transformer)
        with tracker, torch.autocast("cpu", torch.bfloat16):
            model.forward(transformer, resolution, text_tokens).float().pow(2).mean().backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    frozen = sum(p.numel() * p.element_size() for p in transformer.parameters() if not p.requires_grad)
    return {"peak": peak, "rest": peak - frozen, "seconds": time.perf_counter() - start}


def fit_depth(rests: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """Least-squares (a, b_d, b_s) of rest = a + b_d * double + b_s * single over the measured (double, single) points."""
    rows = torch.tensor([[1.0, d, s] for d, s in rests], dtype=torch.float64)
    values = torch.tensor(list(rests.values()), dtype=torch.float64)[:, None]
    a, b_d, b_s = torch.linalg.lstsq(rows, values).solution.flatten().tolist()
    return a, b_d, b_s


def flow_parameter_counts(model: FlowModel) -> tuple[dict[str, int], dict[str, int]]:
    """Exact parameter counts, built on the meta device: the transformer's frozen base, its LoRA adapters and its
    largest module (what ZeRO-3 gathers at once); and each other frozen part (text encoders, VAE) by name."""
    transformer = flow_transformer(model, *model.depth, meta=True)
    lora = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in transformer.modules())
    parts = {name: count(part) for name, part in model.frozen_parts().items()}
    return {"transformer": count(transformer) - lora, "lora": lora, "largest_layer": largest}, parts


def flow_recipes(n: dict[str, int], rest: float) -> dict[str, tuple[float, float]]:
    """(model states, activations) bytes per GPU of each LoRA / full recipe, text encoders and VAE aside: the
    transformer's states from the counts, and the measured step beyond the frozen weights (`rest`) less the fp32
    adapters it holds."""
    base, lora, largest = n["transformer"], n["lora"], n["largest_layer"]
    act = rest - 4 * lora  # activations and temporaries
    # trained bytes per parameter: fp32 weight 4 + fp32 grad 4 + AdamW 8 (8-bit AdamW: 2). DeepSpeed ZeRO-3 (bf16)
    # partitions over the GPUs the 18 bytes of its own estimate (bf16 weight 2, fp32 grad 4, fp32 master 4, Adam 8) and the
    # frozen bf16 weights (2), and gathers one module at a time (its bf16 weights, and for full training their grads).
    # The trainer loads whole modules on the host (zero3_init_disabled) and shards them before DeepSpeed sees them,
    # one parameter at a time (`training.accelerator.partition_before_prepare`): the setup row. Handed whole,
    # DeepSpeed would move the whole bf16 transformer to every GPU first (2 * base bytes: 22.2 GiB for FLUX.1).
    return {
        f"(a) LoRA r={LORA_RANK}, 1 GPU, AdamW": (2 * base + 16 * lora, act),
        f"(b) LoRA r={LORA_RANK}, 1 GPU, 8-bit AdamW": (2 * base + 10 * lora, act),
        f"(c) LoRA r={LORA_RANK}, ZeRO-3 over {GPUS} GPUs": (2 * base / GPUS + 18 * lora / GPUS + 2 * largest, act),
        f"(d) full transformer, ZeRO-3 over {GPUS} GPUs": (18 * base / GPUS + 4 * largest, act),
        "(c), (d) setup: the shards, and one parameter whole at a time": (2 * base / GPUS + 2 * largest, 0.0),
    }


def smallest_card(total: float) -> str:
    """The smallest of CARDS_GB (taken as GiB) that holds `total` bytes and HEADROOM."""
    return next((f"{card} GB" for card in CARDS_GB if total + HEADROOM <= card * GIB), f"> {CARDS_GB[-1]} GB")


def _amount(parameters: int) -> str:
    return f"{parameters / 1e9:.3f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


def report_flow(args: argparse.Namespace) -> None:
    """A flow transformer's LoRA recipes (`--size flux` or `klein`): counts, the measured depth points, the fit, and
    one table per resolution."""
    model = FLOW_MODELS[args.size]
    n, parts = flow_parameter_counts(model)
    depths = [tuple(int(x) for x in d.split(",")) for d in args.depths] if args.depths else FIT_DEPTHS
    full, tokens_text = model.depth, args.text_tokens or model.text_tokens
    kind = "real bf16 tensors, random weights" if args.real else "fake tensors"
    print(f"{model.title}, batch 1, bf16, LoRA r={LORA_RANK} on the family's lora_targets, gradient checkpointing: "
          f"transformer {_amount(n['transformer'])} (bf16 {2 * n['transformer'] / GIB:.1f} GiB), LoRA {_amount(n['lora'])}, "
          f"largest module {_amount(n['largest_layer'])}, " + ", ".join(f"{k} {_amount(v)}" for k, v in parts.items())
          + f" parameters; {tokens_text} text tokens")
    kept = list(parts)[1:]  # what stays once the first part (the big text encoder) is released
    encoders = {f"{model.released} resident": 2 * sum(parts.values()), f"{model.released} released": 2 * sum(parts[k] for k in kept)}
    for resolution in [args.resolution] if args.resolution else [512, 1024]:
        tokens = (resolution // 16) ** 2
        rests = {}
        for d, s in depths:
            step = measure_flow_step(model, d, s, resolution, tokens_text, args.real)
            rests[d, s] = step["rest"]
            print(f"{resolution} px ({tokens} + {tokens_text} tokens), {d} double + {s} single blocks ({kind}, "
                  f"{step['seconds']:.0f} s): peak {step['peak'] / GIB:.3f} GiB, beyond the frozen weights "
                  f"{step['rest'] / GIB:.3f} GiB ({step['rest']:.0f} B)", flush=True)
        extrapolated = None
        if len(rests) >= 3:
            a, b_d, b_s = fit_depth(rests)
            extrapolated = a + b_d * full[0] + b_s * full[1]
            worst = max(abs(a + b_d * d + b_s * s - r) for (d, s), r in rests.items())
            print(f"fit: rest = {a / GIB:.3f} + {b_d / GIB:.4f} * double + {b_s / GIB:.4f} * single GiB (largest residual "
                  f"{worst / 2**20:.1f} MiB) -> {extrapolated / GIB:.3f} GiB at {full[0]} + {full[1]} blocks")
        rest = extrapolated
        if not args.real:  # the whole depth, too, costs nothing with fake tensors
            step = measure_flow_step(model, *full, resolution, tokens_text, real=False)
            rest = step["rest"]
            print(f"measured at {full[0]} + {full[1]} blocks ({step['seconds']:.0f} s): peak {step['peak'] / GIB:.2f} GiB, "
                  f"beyond the frozen weights {rest / GIB:.3f} GiB", flush=True)
        if rest is None:
            continue  # too few points to extrapolate from
        print(f"\n{resolution} px | states GiB | activations GiB | + {', '.join(parts)} | total GiB | fits | "
              f"+ {', '.join(kept)} ({model.released} released) | total GiB | fits |\n|---|---:|---:|---:|---:|---|---:|---:|---|")
        for name, (states, act) in flow_recipes(n, rest).items():
            cells = " | ".join(f"{e / GIB:.1f} | {(states + act + e) / GIB:.1f} | {smallest_card(states + act + e)}"
                               for e in encoders.values())
            print(f"| {name} | {states / GIB:.1f} | {act / GIB:.1f} | {cells} |")
        print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="sdxl", help="sd15, sdxl, flux (FLUX.1 [dev]) or klein (FLUX.2 [klein] 4B)")
    parser.add_argument("--resolution", type=int, default=None, help="px (default: 1024; flux, klein: both 512 and 1024)")
    parser.add_argument("--text_tokens", type=int, default=None,
                        help="flux, klein: text tokens of the prompt (default: the family's max_sequence_length, 512)")
    parser.add_argument("--depths", nargs="*", default=None, metavar="DOUBLE,SINGLE",
                        help="flux, klein: the reduced depths measured for the fit (default: 1,1 2,1 1,2 2,2)")
    parser.add_argument("--real", action="store_true", help="flux, klein: real bf16 tensors with random weights instead "
                        "of fake ones (full width: ~0.9 GiB (flux) or ~0.7 GiB (klein) of weights per double + single block "
                        "pair; slow on a CPU without native bf16)")
    args = parser.parse_args()
    (report_flow if args.size in FLOW_MODELS else report_sd)(args)


if __name__ == "__main__":
    main()

