"""Tiny offline models, built from configs and saved locally, for tests and the demo.

No network: the tiny Stable Diffusion uses the real CLIP BPE vocabulary that ships
inside the open_clip_torch wheel, so prompts tokenize exactly as in SD 1.x.
BLIP-2, LLaVA and FLUX.2 [klein]'s Qwen3 get a small byte-level BPE trained here on a fixed text (Qwen3's with its chat
template), SD3's T5 a unigram vocabulary of its words. The
pytorch-fid Inception weight file is randomly initialised but structurally valid.

Every Stable Diffusion here, the trained tiny base's included, is built from one table of shapes, `SD_SIZES`.
CLI: `python -m sketch2real.testing.build`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SD_DIRNAME = "tiny-sd"
CLIP_DIRNAME = "tiny-clip"
DINOV2_DIRNAME = "tiny-dinov2"
CSD_DIRNAME = "tiny-csd"
SDXL_DIRNAME = "tiny-sdxl"
SD3_DIRNAME = "tiny-sd3"
FLUX_DIRNAME = "tiny-flux"
FLUX2_KLEIN_DIRNAME = "tiny-flux2-klein"
BLIP2_DIRNAME = "tiny-blip2"
LLAVA_DIRNAME = "tiny-llava"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_vocabulary(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Convert open_clip's `bpe_simple_vocab_16e6.txt.gz` into CLIPTokenizer's vocab.json + merges.txt.

    The construction is CLIP's own: 256 byte symbols, the same with `</w>`,
    48,894 merges, then the two special tokens (49,408 entries in all).
    """
    import open_clip

    bpe_file = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(work_dir: str | os.PathLike):
    """A real SD 1.x CLIPTokenizer (49,408 tokens, max length 77) built offline."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocabulary(work_dir)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")


# Stable Diffusion shapes: "tiny" for tests; "sd15" is SD 1.5's architecture (UNet ~860M parameters, CLIP ViT-L/14
# text encoder, the SD VAE) for throughput and memory figures; "sd15_small" keeps SD 1.5's block structure
# (4 levels, 2 layers per block, cross-attention in 3) at reduced width, for CPU benches.
# FLUX.1's VAE latents at any size: 16 channels, its scale and shift, no quant convs (black-forest-labs/FLUX.1-dev)
FLUX_VAE_LATENTS = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)
SD_SIZES: dict[str, dict[str, dict]] = {
    "tiny": {
        "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64, layers_per_block=1),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
    },
    "sd15": {
        "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512, layers_per_block=2),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     projection_dim=768, hidden_act="quick_gelu"),
    },
    "sd15_small": {
        "unet": dict(sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32, sample_size=128, layers_per_block=2),
        "text": dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4,
                     projection_dim=128, hidden_act="quick_gelu"),
    },
    # SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG, penultimate states concatenated: 2048), the
    # "text_time" addition embedding (pooled bigG 1280 + 6 time ids x 256 = 2816), no attention at the first level.
    "sdxl": {
        "unet": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                     cross_attention_dim=2048, norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024, layers_per_block=2,
                    scaling_factor=0.13025),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     projection_dim=768, hidden_act="quick_gelu"),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                       projection_dim=1280, hidden_act="gelu"),
    },
    # the tiny base that learns (sketch2real.testing.pretrain): VAE factor 4 (16x16x4 latents at 64 px), text
    # conditioning at the 8x8 level only (attention over 256 tokens would double a CPU step)
    "tiny_trained": {
        "unet": dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
        "vae": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=64, layers_per_block=1),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
    },
    # SD3: CLIP-L and CLIP-G (both projected; penultimate states side by side, zero-padded to T5's width, then T5's
    # states in the sequence; pooled 32 + 32 = 64), a 16-channel VAE with SD3's shift and scale, an MM-DiT.
    "tiny_sd3": {
        "transformer": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                            pooled_projection_dim=64, pos_embed_max_size=32),  # 512 px: 32 patches a side
        "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64, layers_per_block=1,
                    latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
        "text_2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
        "t5": dict(d_model=64, d_ff=64, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   feed_forward_proj="gated-gelu"),
    },
    # FLUX.1: CLIP-L's pooled embedding (32) and T5's states (64), a 16-channel VAE with FLUX's shift and scale (8x8
    # latents at 64 px, packed 2x2: 16 tokens of 64), double- and single-stream blocks, guidance embedding ([dev]).
    "tiny_flux": {
        "transformer": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                            axes_dims_rope=(4, 6, 6)),
        "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64, layers_per_block=1,
                    **FLUX_VAE_LATENTS),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
        "t5": dict(d_model=64, d_ff=64, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   feed_forward_proj="gated-gelu"),
    },
    # FLUX.1 [dev] at full size (black-forest-labs/FLUX.1-dev's configs: 11.9B transformer, CLIP-L, T5-XXL encoder, VAE):
    # bench/gpu_speed.py builds it on the GPU (`build_flow_matching(device=, dtype=)`), bench/memory_recipes.py counts it
    "flux_dev": {
        "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                            axes_dims_rope=(16, 56, 56)),
        "vae": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024, layers_per_block=2,
                    **FLUX_VAE_LATENTS),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     projection_dim=768, hidden_act="quick_gelu"),
        "t5": dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                   feed_forward_proj="gated-gelu"),
    },
    # FLUX.2 [klein]: a Qwen3 deep enough for the pipeline's layers 9/18/27 (3 x 16 = 48 wide states), a 4-channel VAE
    # with batch-norm statistics (8x8 latents at 64 px, 2x2 patches: 16 tokens of 16), step-distilled (no guidance).
    "tiny_flux2_klein": {
        "transformer": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
        "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64, layers_per_block=1,
                    latent_channels=4, use_quant_conv=False, use_post_quant_conv=False),
        "qwen3": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=1024),
    },
    "tiny_sdxl": {
        "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                     cross_attention_dim=64, norm_num_groups=8),
        "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64, layers_per_block=1),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
        "text_2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
    },
}


def build_vae(size: str, **overrides):
    """The `SD_SIZES[size]` VAE (random weights)."""
    from diffusers import AutoencoderKL

    shapes = {"latent_channels": 4, **SD_SIZES[size]["vae"], **overrides}
    levels = len(shapes["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, **shapes)


def build_unet(size: str, **overrides):
    """The `SD_SIZES[size]` UNet (random weights)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(in_channels=4, out_channels=4, **{**SD_SIZES[size]["unet"], **overrides})


def build_text_encoder(size: str, tokenizer, which: str = "text", projected: bool | None = None):
    """The `SD_SIZES[size]` CLIP text encoder `which` ("text", or SDXL's projected "text_2") for `tokenizer`
    (`projected`: with the text projection; default: for "text_2")."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, **SD_SIZES[size][which])
    projected = which == "text_2" if projected is None else projected
    return (CLIPTextModelWithProjection if projected else CLIPTextModel)(config)


def t5_tokenizer():
    """A T5 tokenizer (unigram over words of the study's prompts, and single characters: any text encodes) built
    offline."""
    import string

    from transformers import T5Tokenizer

    from sketch2real.synthetic import DEFAULT_CATEGORIES

    words = sorted(set(re.findall(r"[a-z]+", (_CAPTION_CORPUS + " ".join(DEFAULT_CATEGORIES)).lower())))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in words] + [(c, -5.0) for c in string.ascii_lowercase + string.digits + "<>_-.,'"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_t5(size: str, tokenizer, **overrides):
    """The `SD_SIZES[size]` T5 encoder for `tokenizer` (random weights), with 28 embedding rows no token reaches, as
    T5 v1.1 has (32,128 rows for 32,100 tokens)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer) + 28, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   **{**SD_SIZES[size]["t5"], **overrides}))


def build_flow_matching(output_dir: str | os.PathLike, size: str, seed: int = 0, device: str | None = None,
                        dtype: torch.dtype | None = None, t5_layers: int | None = None) -> Path:
    """Build and save an SD3 (`tiny_sd3`) or FLUX.1 (`tiny_flux`, `flux_dev`) pipeline of `size` (SD_SIZES) with
    random weights, the real CLIP vocabulary and an offline T5 tokenizer, at `output_dir`, no download. `device`,
    `dtype`: where and in what the weights are made (FLUX.1 [dev]'s 12B on a GPU in bf16 take seconds; in fp32 on a
    CPU, 48 GB and minutes); `t5_layers`: fewer T5 blocks than the size's (a trainer that releases T5 once its
    prompts are encoded trains the same on fewer)."""
    shapes = SD_SIZES[size]
    out = Path(output_dir)
    torch.manual_seed(seed)
    clip, t5_tokens = clip_tokenizer(out / "_vocab"), t5_tokenizer()
    t5 = {"num_layers": t5_layers} if t5_layers else {}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default_dtype)
    try:
        with torch.device(device or "cpu"):
            pipe = _flow_pipeline(size, shapes, clip, t5_tokens, t5)
    finally:
        torch.set_default_dtype(default_dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_vocab")
    del pipe
    if torch.device(device or "cpu").type == "cuda":  # the 12B's blocks back to the GPU (a trainer process runs next)
        torch.cuda.empty_cache()
    return out


def _flow_pipeline(size: str, shapes: dict, clip, t5_tokens, t5: dict):
    """`build_flow_matching`'s pipeline, made where and in what dtype it says."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if "text_2" in shapes:  # SD3: two projected CLIPs, then T5
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**shapes["transformer"]), vae=build_vae(size),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            text_encoder=build_text_encoder(size, clip, "text", projected=True), tokenizer=clip,
            text_encoder_2=build_text_encoder(size, clip, "text_2"), tokenizer_2=clip,
            text_encoder_3=build_t5(size, t5_tokens, **t5), tokenizer_3=t5_tokens,
        )
    else:  # FLUX.1: CLIP-L (pooled), then T5; the resolution-dependent shift of FLUX.1 [dev]'s scheduler
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel(**shapes["transformer"]), vae=build_vae(size),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
            text_encoder=build_text_encoder(size, clip), tokenizer=clip,
            text_encoder_2=build_t5(size, t5_tokens, **t5), tokenizer_2=t5_tokens,
        )
    return pipe


QWEN3_CHAT_TEMPLATE = (  # Qwen3's template for user turns and the generation prompt, thinking switched off
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def qwen3_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE trained offline, Qwen's special tokens and Qwen3's chat template)."""
    from transformers import Qwen2TokenizerFast

    tokens = _caption_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tokens, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, bos_token=None)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_flux2_klein(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a FLUX.2 [klein] pipeline (`tiny_flux2_klein`: random weights, its VAE's batch-norm statistics
    drawn away from 0 and 1 so that the normalisation shows) at `output_dir`, no download."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shapes = SD_SIZES["tiny_flux2_klein"]
    torch.manual_seed(seed)
    tokenizer = qwen3_tokenizer()
    levels = len(shapes["vae"]["block_out_channels"])
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                             **shapes["vae"])
    vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
    vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
                                                **shapes["qwen3"]))
    pipe = Flux2KleinPipeline(
        transformer=Flux2Transformer2DModel(**shapes["transformer"]), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, is_distilled=True,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                  base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096))
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


def build_sd(output_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save a pipeline of `size` (SD_SIZES) with random weights and the real CLIP vocabulary, at
    `output_dir`, no download: a StableDiffusionPipeline in the SD 1.x layout (VAE factor 8, SD's scheduler),
    or a StableDiffusionXLPipeline for the sizes with a second text encoder."""
    from diffusers import (
        DDPMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    shapes = SD_SIZES[size]
    out = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(out / "_vocab")
    unet = build_unet(size)
    vae = build_vae(size)
    text_encoder = build_text_encoder(size, tokenizer)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    if "text_2" in shapes:  # SDXL: its Euler scheduler, a second (projected) encoder with the same vocabulary
        scheduler = EulerDiscreteScheduler(**betas, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, tokenizer_2=tokenizer,
            text_encoder_2=build_text_encoder(size, tokenizer, "text_2"),
        )
    else:  # the scheduler config of SD 1.x (steps_offset=1, scaled_linear betas)
        scheduler = PNDMScheduler(**betas, skip_prk_steps=True, set_alpha_to_one=False)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    DDPMScheduler.from_config(scheduler.config)  # the training scheduler must build from it
    for tmp in (out / "_vocab").iterdir():
        tmp.unlink()
    (out / "_vocab").rmdir()
    return out


def build_tiny_sdxl(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny StableDiffusionXLPipeline of the tests (two text encoders, addition embedding)."""
    return build_sd(output_dir, "tiny_sdxl", seed)


def build_tiny_sd(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny StableDiffusionPipeline of the tests and the demo."""
    return build_sd(output_dir, "tiny", seed)


# A fixed text for the captioners' byte-level BPE: caption-like words and the study's prompts.
_CAPTION_CORPUS = """
a sketch of a cat. a drawing of a dog. a photo of a car. a hot air balloon in the sky. an airplane.
a black and white line drawing of an apple. the subject is viewed from the side, from the front.
what is drawn in this art sketch? provide a detailed description of the viewpoint and pose.
question: answer: user: assistant: the sketch shows a simple outline of an object with a round body.
""" * 4


def _caption_tokenizer(special: list[str]):
    """A byte-level BPE tokenizer (~600 tokens) trained offline on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CAPTION_CORPUS], trainer=trainer)
    return tok


def build_tiny_blip2(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny BLIP-2 (OPT language model) with its processor."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    raw = _caption_tokenizer(["<pad>", "</s>", "<unk>", "<image>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    num_query_tokens = 4
    text_config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=512, word_embed_proj_dim=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32, vocab_size=len(tokenizer)),
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    out = Path(output_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_tiny_llava(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny LLaVA-1.5 (CLIP vision tower, Llama text model) with its processor."""
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    raw = _caption_tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    image_size, patch_size = 32, 8
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, as in llava-1.5's own processor config
    )
    out = Path(output_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def _calibrate_batch_norm(net: torch.nn.Module, seed: int) -> None:
    """Set every BatchNorm's running statistics to those of one batch of varied images.

    With PyTorch's default init the activations of a 90-layer random network
    vanish (features ~1e-10, the same for every image); calibrated statistics
    keep each layer's output normalised, so features differ between images.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(8, 3, 299, 299, generator=generator)
    ramps = torch.linspace(0, 1, 299).view(1, 1, 1, 299).expand(8, 3, 299, 299) * torch.rand(8, 3, 1, 1, generator=generator)
    blocks = (torch.rand(8, 3, 8, 8, generator=generator)).repeat_interleave(38, 2).repeat_interleave(38, 3)[..., :299, :299]
    images = torch.cat([noise, ramps, blocks]) * 2 - 1
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch gives exactly its statistics
    net.train()
    with torch.no_grad():
        net(images)
    net.eval()


def build_tiny_clip(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny CLIPModel + CLIPProcessor (real CLIP vocabulary), for CLIP-score tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(out / "_vocab")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    CLIPModel(config).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    for tmp in (out / "_vocab").iterdir():
        tmp.unlink()
    (out / "_vocab").rmdir()
    return out


def build_tiny_dinov2(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny DINOv2 (ViT, 32 px, random weights) + its image processor, for FD-DINOv2/PRDC tests."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = Path(output_dir)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(out, safe_serialization=True)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out


def write_fid_inception_weights(torch_home: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised, structurally exact pytorch-fid Inception file into `torch_home`.

    pytorch-fid looks for `$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`
    and loads it without a hash check, so `InceptionV3()` then works offline.
    """
    from pytorch_fid import inception as fid_inception

    torch.manual_seed(seed)
    # Build the exact FID module tree, as pytorch-fid does before loading its weights.
    net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    _calibrate_batch_norm(net, seed)
    target = Path(torch_home) / "hub" / "checkpoints" / FID_WEIGHTS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, target)
    return target


@dataclass
class TinyModels:
    """Paths of the tiny models built by `build_all`."""

    sd: Path
    sdxl: Path
    sd3: Path
    flux: Path
    flux2_klein: Path
    clip: Path
    dinov2: Path
    blip2: Path
    llava: Path
    csd: Path
    torch_home: Path


def build_all(output_dir: str | os.PathLike, torch_home: str | os.PathLike | None = None) -> TinyModels:
    """Build every tiny model under `output_dir` (skipping those already saved)."""
    out = Path(output_dir)
    sd, clip, blip2, llava = out / SD_DIRNAME, out / CLIP_DIRNAME, out / BLIP2_DIRNAME, out / LLAVA_DIRNAME
    if not (sd / "model_index.json").exists():
        build_tiny_sd(sd)
    if not (clip / "config.json").exists():
        build_tiny_clip(clip)
    dinov2, sdxl = out / DINOV2_DIRNAME, out / SDXL_DIRNAME
    if not (sdxl / "model_index.json").exists():
        build_tiny_sdxl(sdxl)
    sd3, flux = out / SD3_DIRNAME, out / FLUX_DIRNAME
    if not (sd3 / "model_index.json").exists():
        build_flow_matching(sd3, "tiny_sd3")
    if not (flux / "model_index.json").exists():
        build_flow_matching(flux, "tiny_flux")
    flux2_klein = out / FLUX2_KLEIN_DIRNAME
    if not (flux2_klein / "model_index.json").exists():
        build_flux2_klein(flux2_klein)
    if not (dinov2 / "config.json").exists():
        build_tiny_dinov2(dinov2)
    if not (blip2 / "config.json").exists():
        build_tiny_blip2(blip2)
    if not (llava / "config.json").exists():
        build_tiny_llava(llava)
    csd = out / CSD_DIRNAME
    if not (csd / "model.safetensors").exists():
        build_tiny_csd(csd)
    home = Path(torch_home) if torch_home else out / "torch_home"
    if not (home / "hub" / "checkpoints" / FID_WEIGHTS_NAME).exists():
        write_fid_inception_weights(home)
    return TinyModels(sd=sd, sdxl=sdxl, sd3=sd3, flux=flux, flux2_klein=flux2_klein, clip=clip, dinov2=dinov2, blip2=blip2, llava=llava,
                      csd=csd, torch_home=home)


def build_tiny_csd(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny CSD (random weights) in the released checkpoint's layout, for style-metric tests: an OpenAI-layout CLIP
    vision transformer under `backbone.` (open_clip's, 32 px, patch 8, width 32, 2 blocks, QuickGELU, its
    projection dropped as CSD drops it) with `last_layer_style` and `last_layer_content` (32 -> 16), as
    `model.safetensors`, and a config.json naming its heads (the real ViT-L follows OpenAI's width / 64)."""
    from open_clip.transformer import QuickGELU, VisionTransformer
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    width, style_dim = 32, 16
    backbone = VisionTransformer(image_size=32, patch_size=8, width=width, layers=2, heads=4, mlp_ratio=2.0,
                                 output_dim=style_dim, act_layer=QuickGELU)
    state = {f"backbone.{k}": v.detach().clone() for k, v in backbone.state_dict().items() if k != "proj"}
    for head in ("last_layer_style", "last_layer_content"):  # CSD initialises both from CLIP's projection
        state[head] = width**-0.5 * torch.randn(width, style_dim)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"name": "csd-tiny", "content_proj_head": "default", "vision_heads": 4}))
    return out
