"""The one place that knows how model families differ: SD 1.x/2.x, SDXL, SD3, FLUX.1 and FLUX.2 [klein], entries of
`FAMILIES`.

The family is read from the model (`model_index.json`'s pipeline class, or a loaded pipeline's class), never from a
flag. It says which tokenizers, text encoders, VAE and denoiser there are, how prompts become token inputs and these
the denoiser's conditioning (`Family.tokenize`, `Family.encode`), which layers LoRA adapts, how the denoiser (with a
ControlNet) is called (`Family.predict`), which training scheduler (hence objective: denoising or flow matching) and
validation sampler it uses, how a Textual Inversion file holds its rows, and which diffusers pipeline classes load and
generate. Trainers and scripts ask it and never branch on the family
themselves; a new family is one `FAMILIES` entry (a `Family` subclass where its conditioning or call differs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sketch2real.cli import UserError
from sketch2real.device import device_constant, to_device

# How prompts (and images' sizes) become the denoiser's conditioning: tokenizing, encoding, SDXL's time ids. A run's
# fingerprint and the text store's key hold it, so a change of meaning is another run, not a silent continuation: bump
# it with such a change. 2: a user's own images state their own size and crop (SDXL); SD3's --max_sequence_length
# cuts T5 only.
CONDITIONING_VERSION = 2
SKETCHY_SIZE = (256, 256)  # every Sketchy photo and sketch (256x256/): SDXL's original_size


NOISE_SAMPLERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler",
                  "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                  "unipc": "UniPCMultistepScheduler"}
FLOW_SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler"}


@dataclass
class Conditioning:
    """The denoiser's (and a ControlNet's) text conditioning for a batch: the sequence states, and where the family
    has them the pooled embedding (SDXL, SD3, FLUX.1) and SDXL's micro-conditioning time ids."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """The tensors present, in order (what a wrapped `TextEncoders` returns)."""
        return tuple(t for t in (self.states, self.pooled, self.time_ids) if t is not None)

    @staticmethod
    def from_tuple(parts: tuple[torch.Tensor, ...]) -> Conditioning:
        return Conditioning(*parts)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Conditionings of several batches as one batch."""
        return Conditioning(*(torch.cat(tensors) for tensors in zip(*(part.as_tuple() for part in parts))))

    def expand(self, n: int) -> Conditioning:
        """A batch-1 conditioning repeated n times."""
        return Conditioning(*(t.expand(n, *t.shape[1:]) for t in self.as_tuple()))


@dataclass(frozen=True)
class Family:
    """What differs between families, as names diffusers understands. This base is a UNet family (SD 1.x/2.x,
    SDXL); other denoisers subclass it and override `encode` and `predict`."""

    name: str
    pipeline: str  # text-to-image pipeline class
    controlnet_pipeline: str
    text_encoders: tuple[str, ...]  # component names, in the order their states are concatenated
    tokenizers: tuple[str, ...]
    text_encoder_classes: tuple[str, ...]  # transformers classes
    pooled: bool  # the denoiser also takes a pooled text embedding (SDXL: the last encoder's, with time ids)
    embedding_keys: tuple[str, ...] | None  # Textual Inversion file: one tensor per encoder (None: {token: rows})
    pipeline_classes: str  # a regular expression of the model_index.json `_class_name`s of this family
    safety_checker: bool  # its pipelines have a safety checker component (off unless asked: it blackens sketches)
    tokenizer_classes: tuple[str, ...] = ("CLIPTokenizer",)  # transformers classes, one per tokenizer
    denoiser: str = "unet"  # the denoiser's component name
    denoiser_class: str = "UNet2DConditionModel"
    training_scheduler: str = "DDPMScheduler"  # its class decides the objective (`training.diffusion.objective_for`)
    lora_layers_argument: str = "unet_lora_layers"  # of the pipeline's save_lora_weights
    # encoders read at their penultimate layer whose pooled output is not used: their last layer gets no gradient
    unused_last_layer: tuple[str, ...] = ()
    trainers: tuple[str, ...] = ("dreambooth", "textual_inversion", "controlnet")  # what sketch2real trains on it
    guidance_scale: float = 7.5  # generation's default guidance (classifier-free; FLUX.1 [dev]: the embedded value)
    controlnet_class: str = "ControlNetModel"
    # some of its ControlNet's parameters get no gradient (DDP must be told, or it fails at the second step)
    controlnet_has_unused_parameters: bool = False
    control_image_argument: str = "image"  # what the ControlNet pipeline calls its conditioning image
    vae_class: str = "AutoencoderKL"
    # the encoder after the `embedding_keys` ones that may also learn Textual Inversion rows (SD3/FLUX.1's T5:
    # --enable_t5_ti), and its file key
    optional_embedding_key: str | None = None
    lora_layers: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")  # the denoiser's layers LoRA adapts
    # its text encoders can be trained whole (--train_text_encoder): every weight they have shapes the conditioning,
    # but for `unused_last_layer`
    text_encoder_training: bool = True
    fp16: bool = True  # trains in fp16 (the flow families are bf16 models: T5 and the MM-DiTs overflow in fp16)
    comfyui_lora: bool = True  # its LoRA can also be written in kohya's key format (`comfyui_lora_layers`)
    # the module-name prefix of its LoKr file (`sketch2real.lokr`): LyCORIS' kohya names for UNets; None: LoKr not built
    lokr_prefix: str | None = "lora_unet_"
    resolution_multiple: int = 8  # the VAE's downsampling (the MM-DiTs' 2x2 patches: 16)
    # --torch_compile by repeated block (diffusers' `_repeated_blocks`: FLUX's 57 blocks compile once per block type)
    # rather than whole; a UNet compiles whole: its convolutions and norms between attention blocks are most launches
    compile_regions: bool = False
    # --resolution when not given: diffusers' training scripts' default for the family (SDXL's 1024, its native size;
    # 512 for the others: SD3's and FLUX's scripts too, where 1024 would take 4x the activations)
    training_resolution: int = 512
    # (learning rate, weight decay) of the text encoders' LoRA adapters in diffusers' LoRA script for the family, a
    # parameter group of their own (SDXL, SD3, FLUX.1: --text_encoder_lr 5e-6); None: the denoiser's (SD 1.x's script)
    text_encoder_lora_optimizer: tuple[float, float] | None = None
    # the same for the text encoders trained whole (SD3's and FLUX.1's full scripts: 5e-6, 1e-3); None: the
    # denoiser's (train_dreambooth.py, one group)
    text_encoder_optimizer: tuple[float, float] | None = None
    # DreamBooth's (learning rate, AdamW weight decay) when not given, full weights and LoRA: diffusers' DreamBooth
    # scripts' defaults for the family (SD 1.x: train_dreambooth.py 5e-6 and train_dreambooth_lora.py 5e-4, both 1e-2;
    # SDXL: its LoRA script's 1e-4 and 1e-4, no full script: train_dreambooth.py's; SD3, FLUX: 1e-4 and 1e-4 for both)
    dreambooth_optimizer: tuple[float, float] = (5e-6, 1e-2)
    dreambooth_lora_optimizer: tuple[float, float] = (5e-4, 1e-2)
    # prompt tokens of its long-prompt encoder (T5, Qwen3), the same at training, validation and generation
    # (`with_max_sequence_length`: --max_sequence_length); None: CLIP encoders only, 77 tokens, not a setting
    max_sequence_length: int | None = None
    # the original size SDXL's time ids state for a run's prompts and at generation: Sketchy's (256 px sources,
    # uncropped); None, for a run on a folder of the user's images (`with_own_images`): the drawn size, as diffusers'
    # pipelines state by default, while each trained image states its own (`crop_geometry`, given to `predict`)
    source_size: tuple[int, int] | None = SKETCHY_SIZE

    def with_own_images(self, own_images: bool) -> Family:
        """This family for a run on a folder of the user's images (`source_size`), or on the shards."""
        return dataclasses.replace(self, source_size=None if own_images else SKETCHY_SIZE)

    def with_max_sequence_length(self, length: int | None, flag: str = "--max_sequence_length") -> Family:
        """This family with prompts of `length` tokens in its long-prompt encoder (None: its default, as diffusers'
        scripts); one line for a family whose prompts are CLIP's 77 tokens only."""
        if length is None or length == self.max_sequence_length:
            return self
        if self.max_sequence_length is None:
            raise UserError(f"{flag} sets the T5/Qwen prompt length of SD3, FLUX.1 and FLUX.2 [klein]; {self.name} models "
                            "read prompts of CLIP's 77 tokens only")
        return dataclasses.replace(self, max_sequence_length=length)

    def samplers(self) -> dict[str, str]:
        """Generation's `--scheduler` choices that fit the objective it was trained with, and their diffusers classes:
        the noise-prediction samplers, or for a flow-matching family its pipelines' flow-matching Euler (built from
        a flow config, the others sample noise on SD3 and stop FLUX.1 at its first step)."""
        return FLOW_SAMPLERS if self.flow_matching else NOISE_SAMPLERS

    @property
    def loads_textual_inversion(self) -> bool:
        """Whether its diffusers pipeline has the Textual Inversion loader (`load_textual_inversion`, whose
        `maybe_convert_prompt` spells a multi-vector token out in each prompt): SD's, SDXL's, FLUX.1's; not SD3's."""
        return hasattr(pipeline_class(self), "load_textual_inversion")

    @property
    def told_image_sizes(self) -> bool:
        """Whether its denoiser is told each image's original size and crop (SDXL's time ids)."""
        return bool(self.pooled)

    @property
    def flow_matching(self) -> bool:
        """Whether it trains by flow matching (velocity, `FlowMatchingObjective`), not denoising (epsilon/v)."""
        return self.training_scheduler == "FlowMatchEulerDiscreteScheduler"

    def require(self, trainer: str) -> None:
        """One line when `trainer` is not built for this family yet."""
        if trainer not in self.trainers:
            raise UserError(f"{trainer} is not built for {self.name} models yet (it trains: {', '.join(self.trainers)})")

    def __post_init__(self):
        counts = {len(self.tokenizers), len(self.tokenizer_classes), len(self.text_encoders), len(self.text_encoder_classes)}
        assert len(counts) == 1, f"{self.name}: one class per tokenizer and text encoder"

    def learned_embedding_keys(self, optional: bool = False) -> tuple[str, ...]:
        """The Textual Inversion file's tensor names, one per encoder that learns rows (the first encoders, in
        order); `optional`: with the optional one's (T5's "t5", as diffusers' advanced FLUX script names it)."""
        keys = self.embedding_keys or ()
        return (*keys, self.optional_embedding_key) if optional and self.optional_embedding_key else keys

    def embedding_encoders(self, optional: bool = False) -> int:
        """How many text encoders, the first ones, learn Textual Inversion rows: one per file tensor (SD3 and FLUX.1:
        the CLIPs, pivotal-tuning style, and T5 if `optional`; else T5 reads the token's spelling, frozen)."""
        return len(self.learned_embedding_keys(optional)) if self.embedding_keys else 1

    def learned_embeds(self, token: str, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trained Textual Inversion rows (one tensor per text encoder, in order) as this family's file holds them."""
        return dict(zip(self.learned_embedding_keys(optional=True), rows)) if self.embedding_keys else {token: rows[0]}

    def generation_kwargs(self) -> dict:
        """Pipeline call arguments matching training's conditioning (SDXL: the sources' original size, uncropped;
        none for a run on the user's images: the pipeline's own, the drawn size)."""
        if not self.told_image_sizes or self.source_size is None:
            return {}
        return {"original_size": self.source_size, "crops_coords_top_left": (0, 0)}

    def pipeline_call_defaults(self) -> dict:
        """`generation_kwargs` and generation's default guidance: what validation and the model card's lines call the
        pipeline with, so they draw what `infer/generate.py` draws (pipelines' own defaults differ: SDXL's 5.0, FLUX.1
        ControlNet's 7.0)."""
        return {"guidance_scale": self.guidance_scale, **self.generation_kwargs()}

    def max_length(self, tokenizer) -> int:
        """Token ids per prompt for `tokenizer` (CLIP's 77)."""
        return tokenizer.model_max_length

    def prompts_cut(self, tokenizers: list, prompts: list[str]) -> tuple[int, int]:
        """(how many of `prompts` are longer than the family's last text encoder reads, its token limit): the ends it
        never sees (SD, SDXL: CLIP's 77; SD3, FLUX: T5's `max_sequence_length`, where CLIP's own cut is expected;
        FLUX.2 [klein]: Qwen's, its chat template's few tokens not counted)."""
        tokenizer = tokenizers[-1]
        limit = self.max_sequence_length or self.max_length(tokenizer)
        lengths = (len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids)
        return sum(n > limit for n in lengths), limit

    def tokenize(self, tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> what `encode` reads: one tensor per tokenizer, the token ids padded as the pipelines pad them."""
        from sketch2real.training.diffusion import tokenize

        return [tokenize(tokenizer, prompts, self.max_length(tokenizer)) for tokenizer in tokenizers]

    def comfyui_lora_layers(self, peft_layers: dict[str, dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
        """The adapters (peft's names, by component: `unet`, and the text encoders' with --train_text_encoder) in
        kohya's names (`lora_unet_<module>.lora_down/lora_up.weight` and `.alpha`; SD's one encoder `lora_te_`, SDXL's
        `lora_te1_`/`lora_te2_`), the file A1111, ComfyUI and kohya's scripts read; alpha as trained (diffusers'
        converter writes alpha = rank)."""
        from diffusers.utils import convert_state_dict_to_kohya

        kohya = convert_state_dict_to_kohya({f"{component}.{k}": v for component, layers in peft_layers.items()
                                             for k, v in layers.items()})
        if len(self.text_encoders) == 1:  # the converter names SDXL's encoders; SD 1.x's one is kohya's lora_te_
            kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
        return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v for k, v in kohya.items()}

    def trained_text_encoders(self) -> tuple[str, ...]:
        """The text encoders --train_text_encoder trains (whole, or with --lora_rank their LoRA adapters), as diffusers'
        scripts: the CLIP encoders (those that learn Textual Inversion rows); SD3's and FLUX.1's T5 stays frozen."""
        return self.text_encoders[: self.embedding_encoders()]

    def text_encoder_lora_targets(self, name: str, encoder) -> list[str]:
        """peft `target_modules` of text encoder `name`'s adapters: its attention projections (diffusers' scripts'
        q/k/v/out_proj), but in a last layer whose output the family never reads (`unused_last_layer`): no gradient
        would reach them (DDP would wait for it)."""
        names = [n for n, _ in encoder.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if name in self.unused_last_layer:
            last = max(int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n)))
            names = [n for n in names if f".layers.{last}." not in n]
        return names

    @staticmethod
    def encoder_checkpoint_names(encoder, layers: dict[str, torch.Tensor], saving: bool = True) -> dict[str, torch.Tensor]:
        """A text encoder's adapter weights named as its checkpoints name its modules: transformers 5 flattened
        CLIPTextModel (`encoder.layers.*`) where its checkpoints, transformers 4, kohya's and ComfyUI's LoRA names keep
        `text_model.` (diffusers on transformers 5 loads either). `saving=False`: the file's names back onto `encoder`."""
        if type(encoder).__name__ != "CLIPTextModel" or hasattr(encoder, "text_model"):
            return layers
        if saving:
            return {f"text_model.{k}": v for k, v in layers.items()}
        return {k.removeprefix("text_model."): v for k, v in layers.items()}

    def lora_file_arguments(self, component: str) -> tuple[str, str]:
        """save_lora_weights' arguments for a component's adapter weights and settings (rank, alpha, targets)."""
        layers = self.lora_layers_argument if component == self.denoiser else f"{component}_lora_layers"
        return layers, layers.replace("_lora_layers", "_lora_adapter_metadata")

    def lora_targets(self, denoiser) -> list[str]:
        """peft `target_modules` of the denoiser's LoRA adapters: the attention projections `to_q/k/v/out.0` (diffusers'
        SD and SDXL scripts' defaults; for SD3 and FLUX.1 a subset of diffusers' scripts' defaults, which also adapt the
        text stream's `add_*_proj`/`to_add_out`, and FLUX.1's feed-forwards)."""
        return list(self.lora_layers)

    def lora_file_layers(self, peft_layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The denoiser's adapter weights (peft's names) as this family's LoRA file names them: diffusers' names
        (`lora.down`/`lora.up`) for a UNet, as diffusers' SD scripts write them; peft's where a module has none
        (`--lora_layers` beyond the attention projections: diffusers' loader reads a file of either kind, and
        of a mix it dropped the converted names' adapters with only a warning)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        converted = convert_state_dict_to_diffusers(peft_layers)
        return dict(peft_layers) if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted

    def lora_adapter_layers(self, file_layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The denoiser's adapter weights as its pipeline's `lora_state_dict` reads a LoRA file, in peft's names (the
        inverse of `lora_file_layers`: what `--initial_lora` sets the fresh adapters to)."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        return convert_unet_state_dict_to_peft(file_layers)

    def conditioning_resolution(self, resolution: int) -> int | None:
        """The training resolution `encode` builds into a prompt's conditioning (SDXL's time ids), or None where the
        conditioning is the text's alone: a text store is encoded again for another resolution only where it differs."""
        return resolution if self.told_image_sizes else None

    def encode(self, text_encoders: list, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        """Token ids (one tensor per tokenizer) -> the denoiser's conditioning.

        SD: the encoder's last hidden states. SDXL: the penultimate states of both encoders side by side, the last
        encoder's projected pooled embedding, and time ids saying that images were resized from `source_size`
        (Sketchy's 256 px; a user's images: `resolution`) to `resolution`, uncropped; the same ids are given at
        generation (`generation_kwargs`)."""
        if not self.pooled:
            return Conditioning(text_encoders[0](ids[0])[0])
        states, pooled = [], None
        for encoder, encoder_ids in zip(text_encoders, ids):
            output = encoder(encoder_ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled embedding
        batch = ids[0].shape[0]
        times = device_constant(time_ids, tuple(self.source_size or (resolution, resolution)), (0, 0),
                                (resolution, resolution), device=pooled.device,
                                dtype=pooled.dtype).expand(batch, -1)
        return Conditioning(torch.cat(states, dim=-1), pooled, times)

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: Conditioning, controlnet=None,
                control_image: torch.Tensor | None = None, guidance: float | None = None,
                geometry: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction for `noisy` at `timesteps` (with a ControlNet and its conditioning image;
        `guidance`: what a guidance-distilled denoiser, FLUX.1 [dev], is told; `geometry`: each row's image's
        `crop_geometry`, SDXL's time ids in place of the prompt's, which say Sketchy's 256 px, uncropped)."""
        time_ids = text.time_ids if geometry is None or text.time_ids is None else geometry.to(text.time_ids)
        kwargs = {"encoder_hidden_states": text.states,
                  "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids} if self.pooled else None}
        if controlnet is not None:
            down, mid = controlnet(noisy, timesteps, controlnet_cond=control_image, return_dict=False, **kwargs)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return denoiser(noisy, timesteps, **kwargs).sample

    def validation_scheduler(self, training_scheduler):
        """The sampler of validation images, from the training scheduler's config (SD's PNDM); a zero-terminal-SNR
        model's DDIM with its rescaled betas and trailing timesteps (PNDM has no `rescale_betas_zero_snr`: it drew
        from a schedule the model was not trained on)."""
        from diffusers import DDIMScheduler, PNDMScheduler

        if training_scheduler.config.get("rescale_betas_zero_snr"):
            return DDIMScheduler.from_config(training_scheduler.config, rescale_betas_zero_snr=True,
                                             timestep_spacing="trailing")
        return PNDMScheduler.from_config(training_scheduler.config, skip_prk_steps=True)

    def new_controlnet(self, denoiser, vae_scale_factor: int = 8):
        """A ControlNet starting as a copy of the denoiser's encoder (`ControlNetModel.from_unet`); its conditioning
        embedding downsamples the image by the VAE's factor (diffusers' default channels for 8). Random parts are
        drawn from torch's global generator: seed it first."""
        from diffusers import ControlNetModel

        levels = int(math.log2(vae_scale_factor)) + 1
        return ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])

    def control_input(self, vae, conditions: torch.Tensor, controlnet=None) -> torch.Tensor:
        """What the ControlNet takes for condition images in [0, 1], as its pipeline prepares them (a UNet
        ControlNet: the pixels themselves)."""
        return conditions


def _config(model):
    """A model's diffusers config through a DDP wrapper."""
    return getattr(model, "module", model).config


@dataclass(frozen=True)
class FlowMatchingFamily(Family):
    """What the MM-DiT families share: flow matching with an Euler sampler, prompts of `max_sequence_length` T5
    tokens, ControlNets conditioned on the VAE latents of the condition image, and bf16 (released in bf16; T5's
    activations overflow fp16)."""

    max_sequence_length: int | None = 77  # diffusers' SD3 DreamBooth scripts' default
    fp16: bool = False
    comfyui_lora: bool = False  # kohya's names for MM-DiTs follow the original checkpoints' modules, not built
    # SimpleTuner's LyCORIS names (diffusers' module path, "." as "_"), which ComfyUI reads for SD3 and FLUX.1
    lokr_prefix: str | None = "lycoris_"
    resolution_multiple: int = 16
    controlnet_class: str = "SD3ControlNetModel"
    controlnet_has_unused_parameters: bool = True  # its last block's text-stream output is dropped (as diffusers' script)
    control_image_argument: str = "control_image"

    @property
    def told_image_sizes(self) -> bool:
        return False  # the MM-DiTs' pooled embeddings come without time ids

    def generation_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def lora_file_layers(self, peft_layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's names, as diffusers' SD3/FLUX scripts write them (FLUX.2's loader reads no other: converted
        names of the double blocks' adapters were dropped on loading, without an error)."""
        return peft_layers

    def lora_adapter_layers(self, file_layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's names as read (a UNet's conversion renamed FLUX.2's single blocks' `attn.to_out` DoRA magnitudes to
        `to_out.0`, a module they lack: a DoRA could not be continued)."""
        return file_layers

    def validation_scheduler(self, training_scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(training_scheduler.config)

    def control_input(self, vae, conditions: torch.Tensor, controlnet=None) -> torch.Tensor:
        """The condition images' VAE latents, (z - shift) * scale as for the denoised images. The pipelines sample
        the posterior; training takes its mean (deterministic; the posterior's spread is far below the latents')."""
        with torch.no_grad():
            raw = vae.encode((2 * conditions - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return ((raw - self.control_shift(vae, controlnet)) * vae.config.scaling_factor).float()

    def control_shift(self, vae, controlnet) -> float:
        return vae.config.shift_factor or 0.0


@dataclass(frozen=True)
class SD3Family(FlowMatchingFamily):
    """SD3 / SD3.5 (MM-DiT `SD3Transformer2DModel`, flow matching): CLIP-L and CLIP-G penultimate states side by side,
    zero-padded to T5's width and followed by T5-XXL's states in the sequence; both CLIPs' pooled embeddings
    concatenated; prompts of `max_sequence_length` T5 tokens (77: diffusers' SD3 DreamBooth script's default).
    Its ControlNet (`SD3ControlNetModel`) is called as `StableDiffusion3ControlNetPipeline` calls it."""

    def max_length(self, tokenizer) -> int:
        # T5's the family's length; the CLIPs' their own 77 whatever it is, as StableDiffusion3Pipeline tokenizes
        return self.max_sequence_length if "T5" in type(tokenizer).__name__ else tokenizer.model_max_length

    def encode(self, text_encoders: list, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        *clips, t5 = text_encoders
        states, pooled = [], []
        for encoder, encoder_ids in zip(clips, ids):
            output = encoder(encoder_ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled.append(output[0])
        t5_states = t5(ids[-1])[0]
        clip_states = torch.cat(states, dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return Conditioning(torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def predict(self, denoiser, noisy, timesteps, text, controlnet=None, control_image=None, guidance=None,
                geometry=None):
        kwargs = {"hidden_states": noisy, "timestep": timesteps, "encoder_hidden_states": text.states,
                  "pooled_projections": text.pooled}
        if controlnet is not None:
            config = _config(controlnet)  # InstantX's SD3 ControlNets: zero pooled input; SD3.5's: no text states
            kwargs["block_controlnet_hidden_states"] = controlnet(
                hidden_states=noisy, timestep=timesteps, controlnet_cond=control_image,
                encoder_hidden_states=text.states if config.joint_attention_dim is not None else None,
                pooled_projections=torch.zeros_like(text.pooled) if config.force_zeros_for_pooled_projection else text.pooled,
                return_dict=False)[0]
        return denoiser(**kwargs).sample

    def new_controlnet(self, denoiser, vae_scale_factor: int = 8):
        """`SD3ControlNetModel.from_transformer` (12 blocks as diffusers' default, fewer for a shallower transformer:
        never its last, which has no context output), taking the pooled prompt and the shifted latents as diffusers'
        SD3 ControlNet script trains it (its config says so to the pipeline)."""
        from diffusers import SD3ControlNetModel

        controlnet = SD3ControlNetModel.from_transformer(denoiser, num_layers=min(12, denoiser.config.num_layers - 1),
                                                         num_extra_conditioning_channels=0)
        controlnet.register_to_config(force_zeros_for_pooled_projection=False)
        # off the list of values left at their defaults, which from_config and from_pretrained read as the default's
        # (True: a saved ControlNet the pipeline then ran on zero pooled prompts and unshifted latents)
        defaults = [k for k in controlnet.config.get("_use_default_values", []) if k != "force_zeros_for_pooled_projection"]
        controlnet.register_to_config(_use_default_values=defaults)
        return controlnet

    def control_shift(self, vae, controlnet) -> float:
        # the pipeline leaves the shift out for ControlNets trained on zero pooled projections (InstantX's)
        if controlnet is not None and _config(controlnet).force_zeros_for_pooled_projection:
            return 0.0
        return vae.config.shift_factor or 0.0


@dataclass(frozen=True)
class FluxFamily(FlowMatchingFamily):
    """FLUX.1 (`FluxTransformer2DModel`, flow matching): CLIP-L's pooled embedding and T5-XXL's states (512 tokens by default, as
    diffusers' FLUX pipeline and scripts); latents packed 2x2 into a sequence with position ids, the timestep given as
    t / 1000, and for the guidance-distilled [dev] the guidance value (`--guidance_scale`). Its ControlNet
    (`FluxControlNetModel`) takes the packed latents of the condition image, as `FluxControlNetPipeline` gives them."""

    max_sequence_length: int | None = 512  # diffusers' FLUX pipeline and scripts
    controlnet_class: str = "FluxControlNetModel"

    def max_length(self, tokenizer) -> int:
        return self.max_sequence_length if "T5" in type(tokenizer).__name__ else tokenizer.model_max_length

    def encode(self, text_encoders: list, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        clip, t5 = text_encoders
        pooled = clip(ids[0], output_hidden_states=False).pooler_output
        return Conditioning(t5(ids[1])[0], pooled)

    def predict(self, denoiser, noisy, timesteps, text, controlnet=None, control_image=None, guidance=None,
                geometry=None):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = device_constant(FluxPipeline._prepare_latent_image_ids, b, h // 2, w // 2, "cpu", torch.float32,
                                    device=noisy.device, dtype=noisy.dtype)
        text_ids = torch.zeros(text.states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        value = torch.full((b,), 1.0 if guidance is None else guidance, device=noisy.device)
        common = {"timestep": timesteps / 1000, "pooled_projections": text.pooled, "encoder_hidden_states": text.states,
                  "txt_ids": text_ids, "img_ids": image_ids, "return_dict": False}
        blocks = {}
        if controlnet is not None:
            control = FluxPipeline._pack_latents(control_image, b, c, h, w)
            blocks["controlnet_block_samples"], blocks["controlnet_single_block_samples"] = controlnet(
                hidden_states=packed, controlnet_cond=control,
                guidance=value if _config(controlnet).guidance_embeds else None, **common)
        out = denoiser(hidden_states=packed, guidance=value if _config(denoiser).guidance_embeds else None, **common,
                       **blocks)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def new_controlnet(self, denoiser, vae_scale_factor: int = 8):
        """`FluxControlNetModel.from_transformer` with diffusers' FLUX ControlNet script's default depth (4 double,
        10 single blocks; fewer if the transformer has fewer)."""
        from diffusers import FluxControlNetModel

        config = denoiser.config
        return FluxControlNetModel.from_transformer(
            denoiser, num_layers=min(4, config.num_layers), num_single_layers=min(10, config.num_single_layers),
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)


@dataclass(frozen=True)
class Flux2KleinFamily(FlowMatchingFamily):
    """FLUX.2 [klein] (`Flux2Transformer2DModel`, flow matching; 4B/9B): one Qwen3 text encoder, each prompt put through
    its chat template (no thinking) and read at layers `TEXT_LAYERS`, stacked side by side (no pooled embedding);
    512 tokens with their attention mask, as `Flux2KleinPipeline` encodes them. Its VAE's latents are normalised by
    the VAE's batch-norm statistics per channel of 2x2 patches (`training.diffusion.scaled_latents`); here they stay
    in the VAE's layout, and `predict` patchifies and packs them into a sequence with 4-D (t, h, w, l) position ids.
    The step-distilled models take no guidance value (`guidance_embeds` false)."""

    max_sequence_length: int | None = 512  # Flux2KleinPipeline's
    TEXT_LAYERS = (9, 18, 27)  # the pipeline's `text_encoder_out_layers`
    lokr_prefix: str | None = None  # ComfyUI's reading of FLUX.2 LyCORIS files not established

    def tokenize(self, tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
        """The chat-templated prompts' ids and attention mask, stacked: [batch, 2, max_sequence_length] (Qwen's padded positions
        read the mask)."""
        (tokenizer,) = tokenizers
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False) for prompt in prompts]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_sequence_length,
                           return_tensors="pt")
        return [torch.stack([tokens.input_ids, tokens.attention_mask], dim=1)]

    def encode(self, text_encoders: list, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        (encoder,), (tokens,) = text_encoders, ids
        language_model = getattr(encoder, "model", encoder)  # the decoder stack: its LM head's logits are not needed
        output = language_model(input_ids=tokens[:, 0], attention_mask=tokens[:, 1], output_hidden_states=True,
                                use_cache=False)
        return Conditioning(torch.stack([output.hidden_states[k] for k in self.TEXT_LAYERS], dim=2).flatten(2))

    def predict(self, denoiser, noisy, timesteps, text, controlnet=None, control_image=None, guidance=None,
                geometry=None):
        from diffusers import Flux2Pipeline

        b, c, h, w = noisy.shape
        patches = Flux2Pipeline._patchify_latents(noisy)
        value = None
        if _config(denoiser).guidance_embeds:  # FLUX.2 [dev]-style guidance distillation
            value = torch.full((b,), 1.0 if guidance is None else guidance, device=noisy.device)
        out = denoiser(hidden_states=Flux2Pipeline._pack_latents(patches), encoder_hidden_states=text.states,
                       timestep=timesteps / 1000, guidance=value,
                       img_ids=to_device(Flux2Pipeline._prepare_latent_ids(patches), noisy.device),
                       txt_ids=to_device(Flux2Pipeline._prepare_text_ids(text.states), noisy.device),
                       return_dict=False)[0]
        return Flux2Pipeline._unpatchify_latents(out.transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2))

    def lora_targets(self, denoiser) -> list[str]:
        """As diffusers' FLUX.2 [klein] script: the double blocks' attention, the single blocks' fused QKV-MLP input
        and their attention output."""
        singles = _config(denoiser).num_single_layers
        return [*self.lora_layers, "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles))]


# diffusers' SD3, FLUX.1 and FLUX.2 [klein] DreamBooth scripts (klein: LoRA only; FLUX.1's full script for full weights)
# diffusers' SD3 and FLUX.1 DreamBooth scripts, full and LoRA: also their text encoders' own group (5e-6, 1e-3)
FLOW_DREAMBOOTH_OPTIMIZERS = {"dreambooth_optimizer": (1e-4, 1e-4), "dreambooth_lora_optimizer": (1e-4, 1e-4),
                              "text_encoder_optimizer": (5e-6, 1e-3)}
SD = Family("sd", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline", ("text_encoder",), ("tokenizer",),
            ("CLIPTextModel",), pooled=False, embedding_keys=None, safety_checker=True,
            pipeline_classes=r"StableDiffusion(ControlNet|Img2Img|Inpaint|InstructPix2Pix)?Pipeline")
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline", ("text_encoder", "text_encoder_2"),
              ("tokenizer", "tokenizer_2"), ("CLIPTextModel", "CLIPTextModelWithProjection"), pooled=True,
              embedding_keys=("clip_l", "clip_g"), safety_checker=False, unused_last_layer=("text_encoder",),
              tokenizer_classes=("CLIPTokenizer", "CLIPTokenizer"), training_resolution=1024,
              text_encoder_lora_optimizer=(5e-6, 1e-3), dreambooth_lora_optimizer=(1e-4, 1e-4),
              pipeline_classes=r"StableDiffusionXL(ControlNet|Img2Img|Inpaint)?Pipeline")
SD3 = SD3Family("sd3", "StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline",
                ("text_encoder", "text_encoder_2", "text_encoder_3"), ("tokenizer", "tokenizer_2", "tokenizer_3"),
                ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"), pooled=True,
                embedding_keys=("clip_l", "clip_g"), optional_embedding_key="t5", safety_checker=False,
                tokenizer_classes=("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast"), denoiser="transformer",
                denoiser_class="SD3Transformer2DModel", training_scheduler="FlowMatchEulerDiscreteScheduler",
                lora_layers_argument="transformer_lora_layers", trainers=("dreambooth", "textual_inversion", "controlnet"),
                guidance_scale=7.0, text_encoder_lora_optimizer=(5e-6, 1e-3), **FLOW_DREAMBOOTH_OPTIMIZERS,
                pipeline_classes=r"StableDiffusion3(ControlNet|Img2Img|Inpaint)?Pipeline")
FLUX = FluxFamily("flux", "FluxPipeline", "FluxControlNetPipeline", ("text_encoder", "text_encoder_2"),
                  ("tokenizer", "tokenizer_2"), ("CLIPTextModel", "T5EncoderModel"), pooled=True, embedding_keys=("clip_l",),
                  optional_embedding_key="t5", safety_checker=False, tokenizer_classes=("CLIPTokenizer", "T5TokenizerFast"),
                  denoiser="transformer",
                  denoiser_class="FluxTransformer2DModel", training_scheduler="FlowMatchEulerDiscreteScheduler",
                  lora_layers_argument="transformer_lora_layers", trainers=("dreambooth", "textual_inversion", "controlnet"),
                  guidance_scale=3.5, compile_regions=True, text_encoder_lora_optimizer=(5e-6, 1e-3),
                  **FLOW_DREAMBOOTH_OPTIMIZERS,
                  pipeline_classes=r"Flux(ControlNet|Img2Img|Inpaint)?Pipeline")
FLUX2_KLEIN = Flux2KleinFamily("flux2-klein", "Flux2KleinPipeline", "", ("text_encoder",), ("tokenizer",),
                               ("Qwen3ForCausalLM",), pooled=False, embedding_keys=None, safety_checker=False,
                               tokenizer_classes=("Qwen2TokenizerFast",), denoiser="transformer",
                               denoiser_class="Flux2Transformer2DModel", vae_class="AutoencoderKLFlux2",
                               training_scheduler="FlowMatchEulerDiscreteScheduler",
                               lora_layers_argument="transformer_lora_layers", trainers=("dreambooth",), compile_regions=True,
                               guidance_scale=4.0, text_encoder_training=False, pipeline_classes=r"Flux2KleinPipeline",
                               **FLOW_DREAMBOOTH_OPTIMIZERS)
FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL, SD3, FLUX, FLUX2_KLEIN)}  # the registry: a new family is an entry
# the tensor names of per-encoder Textual Inversion files, whatever the family (a file of only these has no token key)
ENCODER_EMBEDDING_KEYS = {key for family in FAMILIES.values() for key in family.learned_embedding_keys(optional=True)}


def family_of_class(class_name: str, where: str = "") -> Family:
    """The registered family whose pipelines include `class_name`; one line naming what is supported otherwise."""
    for family in FAMILIES.values():
        if re.fullmatch(family.pipeline_classes, class_name):
            return family
    supported = ", ".join(f"{f.name} ({f.pipeline})" for f in FAMILIES.values())
    raise UserError(f"{where or 'the model'} is a {class_name or 'pipeline of unknown class'}: not a family sketch2real "
                    f"trains ({supported})")


def family_of(name_or_path: str, revision: str | None = None) -> Family:
    """The family of a diffusers pipeline folder or hub id, from its `model_index.json`."""
    return family_of_class(model_index(name_or_path, revision).get("_class_name", ""), name_or_path)


def recorded_family(folder: str | Path) -> Family | None:
    """The family of the base model a training output (a LoRA folder) was trained on, as its `run_config.json`
    records it; None where it records none or that model cannot be read here (a LoRA from elsewhere)."""
    config = Path(folder) / "run_config.json"
    try:
        recorded = json.loads(config.read_text())
        base, revision = recorded["pretrained_model_name_or_path"], recorded.get("revision")
        if not Path(base).is_dir():  # a hub id: from the hub cache only (no network round trip for a check)
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "model_index.json", revision=revision)
            if not isinstance(cached, str):
                return None
            return family_of_class(json.loads(Path(cached).read_text()).get("_class_name", ""), base)
        return family_of(base, revision)
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None


def check_lora_family(lora: str | Path, family: Family, flag: str, model: str) -> None:
    """One line, before any weight loads, when the LoRA folder `lora` was trained on a model of another family than
    `model`'s (diffusers loaded such a LoRA in part, or not at all, with only a warning)."""
    theirs = recorded_family(lora) if Path(lora).is_dir() else None
    if theirs is not None and theirs.name != family.name:
        raise UserError(f"{flag} {lora} is a LoRA of a {theirs.name} model (its run_config.json), {model} is a "
                        f"{family.name} model: give a base model of its family")


def pipeline_settings(index: dict) -> dict:
    """The pipeline's own settings in a `model_index.json` (not components), e.g. FLUX.2 [klein]'s `is_distilled`:
    a pipeline assembled from components must be given them, or it behaves as another model."""
    return {k: v for k, v in index.items() if not k.startswith("_") and not (isinstance(v, list) and len(v) == 2)}


def model_index(name_or_path: str, revision: str | None = None) -> dict:
    """A diffusers pipeline's `model_index.json` (folder or hub id); one line when it cannot be read."""
    local = Path(name_or_path) / "model_index.json"
    try:
        folder = Path(name_or_path).is_dir()
    except (OSError, ValueError):  # a name no file system takes (too long, a NUL): the hub's lookup says so below
        folder = False
    if folder and not local.is_file():  # not a question for the hub
        what = next((kind for file, kind in (("config.json", "a single model (a UNet or a ControlNet: give the pipeline folder it goes with; "
                                                              "infer/generate.py takes a ControlNet as --controlnet)"),
                                             ("learned_embeds.safetensors", "Textual Inversion embeddings (give them as --textual_inversion, with their base model)"))
                     if (Path(name_or_path) / file).is_file()), "no diffusers pipeline")
        raise UserError(f"{name_or_path} has no model_index.json: {what}, not a pipeline folder")
    try:
        if local.is_file():
            index = json.loads(local.read_text())
        else:
            from huggingface_hub import hf_hub_download

            index = json.loads(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision)).read_text())
    except Exception as err:  # not a pipeline, offline without a cache, a typo
        raise UserError(f"cannot read the model index of {name_or_path}: {str(err).strip().splitlines()[0]}") from err
    return index


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from its class."""
    return family_of_class(type(pipe).__name__)


def native_size(pipe) -> int:
    """The side in pixels a loaded pipeline generates at when given none: its denoiser's sample size (SD 1.x, SDXL,
    SD3: the config's; FLUX: a fixed 128) times the VAE's downsampling, as each diffusers pipeline computes it."""
    latent = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    return int(latent * pipe.vae_scale_factor)


def pipeline_class(family: Family, controlnet: bool = False):
    """The diffusers pipeline class that generates with this family (with a ControlNet, if asked)."""
    import diffusers

    return getattr(diffusers, family.controlnet_pipeline if controlnet else family.pipeline)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) as one row."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


def _without_tied_aliases(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state dict of `module` with each tied parameter once, under its first name (T5's `shared` and
    `encoder.embed_tokens`, one embedding): checkpoints' safetensors refused two names of one tensor (no Textual
    Inversion checkpoint of T5 could be saved), and DeepSpeed, which drops frozen parameters by their first name only,
    kept T5-XXL's whole embedding (263 MB) in every one. Loading the first name fills both."""
    first = {name for name, _ in module.named_parameters()}
    for name, _ in module.named_parameters(remove_duplicate=False):
        if name not in first:
            state_dict.pop(prefix + name, None)


class TextEncoders(torch.nn.Module):
    """A family's text encoders as one module, token ids (one tensor per tokenizer) in, conditioning out as a tuple
    (states, and for SDXL pooled embedding and time ids): what DDP/DeepSpeed wrap when the encoders train.

    Encoders are held by their pipeline component names (`encoders.text_encoder_2.*`), so trained weights map
    back onto a pipeline by name."""

    def __init__(self, family: Family, encoders: list, resolution: int):
        super().__init__()
        self.family, self.resolution = family, resolution
        self.encoders = torch.nn.ModuleDict(dict(zip(family.text_encoders, encoders)))
        self.register_state_dict_post_hook(_without_tied_aliases)


    def forward(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.family.encode(list(self.encoders.values()), ids, self.resolution).as_tuple()

    def train(self, mode: bool = True) -> TextEncoders:
        """Train mode for the encoders whose weights train; a frozen one (SD3's and FLUX.1's T5 beside trained CLIP
        adapters or rows), or one learning only new token rows (Textual Inversion's `new_rows`: T5 with
        --enable_t5_ti), conditions as at generation: T5's dropout (0.1) would otherwise perturb every training step,
        from the global generator a resumed run cannot replay; the latter's layers stay in train mode alone, for
        --gradient_checkpointing."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        super().train(mode)
        for encoder in self.encoders.values():
            trained = [name for name, p in encoder.named_parameters() if p.requires_grad]
            if all(name.endswith("new_rows") for name in trained):
                encoder.eval()
                for layer in encoder.modules():  # new rows learn through its layers: they keep checkpointing, which
                    if trained and isinstance(layer, GradientCheckpointingLayer):  # transformers does in train mode
                        layer.training = mode
        return self

    def train_what_conditions(self) -> None:
        """Make every weight that shapes the conditioning trainable, and only those.

        The family's trained encoders only (`trained_text_encoders`: not SD3's and FLUX.1's T5, as diffusers' scripts).
        SDXL reads the penultimate layer of each encoder and the pooled embedding of the last one only, so the
        other encoders' last layer and final norm never get a gradient. Left trainable, one process skips them
        while DeepSpeed applies weight decay to their zero gradients (the runs part ways), and DDP's reducer
        waits for their gradients.
        """
        for name in self.family.trained_text_encoders():
            encoder = self.encoders[name]
            encoder.requires_grad_(True)
            if name in self.family.unused_last_layer:
                transformer = getattr(encoder, "text_model", encoder)  # transformers < 5 nests it
                transformer.encoder.layers[-1].requires_grad_(False)
                transformer.final_layer_norm.requires_grad_(False)


def embedding_file(file: str, keys_wanted: Iterable[str] = ()) -> tuple[set[str], str | None, dict]:
    """What a Textual Inversion safetensors file holds: its tensor names, the token it is loaded under and the tensors
    named in `keys_wanted`. The token: the file's `token` metadata; else a file of per-encoder tensors (`clip_l`,
    `clip_g`, `t5`) goes by its file name, as A1111 loads it; else a one-tensor diffusers file by that tensor's name,
    as diffusers loads it; else None (diffusers asks for one)."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in keys & set(keys_wanted)}
    per_encoder = keys and keys <= ENCODER_EMBEDDING_KEYS
    token = metadata.get("token") or (Path(file).stem if per_encoder else next(iter(keys)) if len(keys) == 1 else None)
    return keys, token, tensors


def load_textual_inversion(pipe, file: str) -> None:
    """Load a Textual Inversion file into a pipeline of any family.

    One embedding for the family's one encoder: diffusers' format ({token: vectors}). Several encoders: the
    community format with one tensor per encoder (SDXL's `clip_l` and `clip_g`: A1111, kohya); the token is the
    file's `token` metadata, else its name as A1111 uses it. A file holding other tensors is refused (an SD 1.x
    embedding given to SDXL would fit the first encoder only).
    """
    family = family_of_pipeline(pipe)
    if not family.embedding_keys:
        try:  # the token `embedding_file` reads (generation's prompt check reads the same)
            keys, token, _ = embedding_file(file)
        except Exception:  # not safetensors (A1111's .pt, diffusers' .bin): diffusers reads it as it does
            keys, token = set(), None
        if keys and keys <= ENCODER_EMBEDDING_KEYS:  # diffusers' error printed the tensors
            raise UserError(f"{file} holds {', '.join(sorted(keys))}: an embedding of a model with several text encoders "
                            f"(SDXL, SD3, FLUX.1), not of a {family.name} model (one tensor named by its token)")
        pipe.load_textual_inversion(file, token=token)
        return
    keys, token, tensors = embedding_file(file, family.learned_embedding_keys(optional=True))
    foreign = sorted(keys & ENCODER_EMBEDDING_KEYS - set(family.learned_embedding_keys(optional=True)))
    if foreign:  # SD3's clip_g beside clip_l and t5, given to FLUX.1: its other rows loaded, silently
        raise UserError(f"{file} holds {', '.join(repr(k) for k in foreign)}, for an encoder a {family.name} model does "
                        f"not have: an embedding of another family (a {family.name} embedding holds "
                        f"{' and '.join(repr(k) for k in family.learned_embedding_keys(optional=True))})")
    if not set(family.embedding_keys) <= set(tensors):
        raise UserError(f"{file} holds {', '.join(sorted(keys)) or 'nothing'}: not a {family.name} embedding (an SD 1.x "
                        f"embedding holds one tensor named by its token); a {family.name} model needs {' and '.join(repr(k) for k in family.embedding_keys)} tensors "
                        "(one per text encoder)")
    learned = family.learned_embedding_keys(optional=family.optional_embedding_key in tensors)  # T5's rows, if any
    for key, encoder, tokenizer in zip(learned, family.text_encoders, family.tokenizers):
        if family.loads_textual_inversion:
            pipe.load_textual_inversion(tensors[key], token=token, text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))
        else:  # SD3's pipelines have no loader: the same rows under diffusers' token names (<t>, <t>_1, ...)
            append_token_rows(getattr(pipe, tokenizer), getattr(pipe, encoder), token, tensors[key])


# What a ControlNet shares with the denoiser it steers: the latent and text widths it is fed, the blocks whose outputs it
# adds to (UNets), the attention layout (MM-DiTs); a ControlNet of another model fails only at its first forward.
CONTROLNET_INTERFACE = ("in_channels", "cross_attention_dim", "block_out_channels", "addition_embed_type",
                        "projection_class_embeddings_input_dim", "joint_attention_dim", "pooled_projection_dim",
                        "attention_head_dim", "num_attention_heads", "patch_size")


def check_controlnet_class(path: str, family: Family, flag: str, model: str) -> None:
    """One line, before it loads, for a ControlNet folder saved as another family's class (a FLUX ControlNet given to
    an SD model loaded as SD's class, default weights and all, and was then said to differ in its defaults)."""
    config = Path(path) / "config.json"
    saved = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if saved and saved != family.controlnet_class:
        owner = next((f.name for f in FAMILIES.values() if f.controlnet_class == saved), None)
        raise UserError(f"{flag} {path} is a {saved}" + (f" (a {owner} ControlNet)" if owner else "") + f": {model} is a "
                        f"{family.name} model, whose ControlNets are {family.controlnet_class}")


def controlnet_mismatch(controlnet, denoiser) -> str:
    """How a ControlNet's config differs from its denoiser's where both name a setting of `CONTROLNET_INTERFACE`
    ("" when it fits)."""
    a, b = dict(controlnet.config), dict(denoiser.config)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return ", ".join(f"{k}: {a[k]} in the ControlNet, {b[k]} in the model" for k in CONTROLNET_INTERFACE
                     if k in a and k in b and norm(a[k]) != norm(b[k]))


def spell_out_tokens(pipe, prompt: str) -> str:
    """`prompt` as a pipeline without diffusers' Textual Inversion loader (SD3's) must be given it: each loaded
    multi-vector token spelt out (`<t>` -> `<t> <t>_1 ...`), as training spells it and diffusers' loader does in the
    other pipelines (given those, the prompt is unchanged: they expand it themselves)."""
    if hasattr(pipe, "maybe_convert_prompt") or getattr(pipe, "tokenizer", None) is None:
        return prompt
    added = set(pipe.tokenizer.get_added_vocab())
    for token in sorted(added, key=len, reverse=True):
        if f"{token}_1" not in added or f"{token}_1" in prompt:  # one vector, or spelt out already
            continue
        count = 1
        while f"{token}_{count}" in added:
            count += 1
        prompt = spell_out(prompt, token, count)
    return prompt


def spell_out(prompt: str, token: str, num_vectors: int) -> str:
    """`prompt` with `token` of `num_vectors` rows written as its names (`<t>` -> `<t> <t>_1 ...`)."""
    return prompt.replace(token, " ".join(placeholder_tokens(token, num_vectors)))


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """diffusers' naming for multi-vector tokens: <t>, <t>_1, <t>_2, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def append_token_rows(tokenizer, text_encoder, token: str, rows: torch.Tensor) -> None:
    """Add `token` (diffusers' names <t>, <t>_1, ... for several rows) to a tokenizer and its encoder's embedding
    with the given rows. Multi-vector prompts must then spell every name out (a pipeline without diffusers'
    Textual Inversion loader does not expand them)."""
    rows = rows.reshape(-1, rows.shape[-1])
    names = placeholder_tokens(token, len(rows))
    if tokenizer.add_tokens(names) != len(names):
        raise UserError(f"token {token!r} is already in the vocabulary of {type(text_encoder).__name__}")
    text_encoder.resize_token_embeddings(len(tokenizer))
    embedding = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embedding[tokenizer.convert_tokens_to_ids(names)] = rows.to(embedding.device, embedding.dtype)
