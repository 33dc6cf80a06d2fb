"""The one place that knows how model families differ: SD 1.x/2.x and SDXL, entries of `FAMILIES`.

The family is read from the model (`model_index.json`'s pipeline class, or a loaded pipeline's class), never from a
flag. It says which tokenizers and text encoders there are, how prompts become the UNet's conditioning (SDXL: the
penultimate hidden states of both encoders side by side, the second encoder's pooled embedding, and the
micro-conditioning time ids), how a Textual Inversion file holds its rows, and which diffusers pipeline classes
load and generate. Trainers and scripts ask it and never branch on the family themselves; a new family is one
`Family` entry (and, where its conditioning differs, the functions here that read its fields).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sketch2real.cli import UserError

SKETCHY_SIZE = (256, 256)  # every Sketchy photo and sketch (rendered_256x256): SDXL's original_size


@dataclass(frozen=True)
class Family:
    """What differs between families, as names diffusers understands."""

    name: str
    pipeline: str  # text-to-image pipeline class
    controlnet_pipeline: str
    text_encoders: tuple[str, ...]  # component names, in the order their states are concatenated
    tokenizers: tuple[str, ...]
    text_encoder_classes: tuple[str, ...]  # transformers classes
    pooled: bool  # the UNet also takes the last encoder's pooled embedding and time ids (SDXL's added conditioning)
    embedding_keys: tuple[str, ...] | None  # Textual Inversion file: one tensor per encoder (None: {token: rows})
    pipeline_classes: str  # a regular expression of the model_index.json `_class_name`s of this family
    safety_checker: bool  # its pipelines have a safety checker component (off unless asked: it blackens sketches)

    def learned_embeds(self, token: str, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trained Textual Inversion rows (one tensor per text encoder, in order) as this family's file holds them."""
        return dict(zip(self.embedding_keys, rows)) if self.embedding_keys else {token: rows[0]}

    def generation_kwargs(self, source_size: tuple[int, int] = SKETCHY_SIZE) -> dict:
        """Pipeline call arguments matching training's conditioning (SDXL: the sources' original size, uncropped)."""
        return {"original_size": source_size, "crops_coords_top_left": (0, 0)} if self.pooled else {}


SD = Family("sd", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline", ("text_encoder",), ("tokenizer",),
            ("CLIPTextModel",), pooled=False, embedding_keys=None, safety_checker=True,
            pipeline_classes=r"StableDiffusion(ControlNet|Img2Img|Inpaint|InstructPix2Pix)?Pipeline")
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline", ("text_encoder", "text_encoder_2"),
              ("tokenizer", "tokenizer_2"), ("CLIPTextModel", "CLIPTextModelWithProjection"), pooled=True,
              embedding_keys=("clip_l", "clip_g"), safety_checker=False, pipeline_classes=r"StableDiffusionXL(ControlNet|Img2Img|Inpaint)?Pipeline")
FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL)}  # the registry: a new family is an entry


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
    local = Path(name_or_path) / "model_index.json"
    try:
        if local.is_file():
            index = json.loads(local.read_text())
        else:
            from huggingface_hub import hf_hub_download

            index = json.loads(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision)).read_text())
    except Exception as err:  # not a pipeline, offline without a cache, a typo
        raise UserError(f"cannot read the model index of {name_or_path}: {str(err).strip().splitlines()[0]}") from err
    return family_of_class(index.get("_class_name", ""), name_or_path)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from its class."""
    return family_of_class(type(pipe).__name__)


def pipeline_class(family: Family, controlnet: bool = False):
    """The diffusers pipeline class that generates with this family (with a ControlNet, if asked)."""
    import diffusers

    return getattr(diffusers, family.controlnet_pipeline if controlnet else family.pipeline)


@dataclass
class Conditioning:
    """The UNet's (and a ControlNet's) text conditioning for a batch."""

    states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (pooled) and time_ids

    def unet_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.states, "added_cond_kwargs": self.added}

    def expand(self, n: int) -> Conditioning:
        """A batch-1 conditioning repeated n times."""
        added = {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()} if self.added else None
        return Conditioning(self.states.expand(n, *self.states.shape[1:]), added)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) as one row."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


def encode_prompt_ids(family: Family, text_encoders: list, ids: list[torch.Tensor], resolution: int,
                      source_size: tuple[int, int]) -> Conditioning:
    """Token ids (one tensor per tokenizer) -> the UNet's conditioning for this family.

    SDXL: images were resized from `source_size` (Sketchy's 256 px) to `resolution`, uncropped; the same
    ids are given at generation (`generation_kwargs`)."""
    if not family.pooled:
        return Conditioning(text_encoders[0](ids[0])[0])
    states, pooled = [], None
    for encoder, encoder_ids in zip(text_encoders, ids):
        output = encoder(encoder_ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder's projected pooled embedding
    batch = ids[0].shape[0]
    times = time_ids(source_size, (0, 0), (resolution, resolution)).to(pooled.device, pooled.dtype).expand(batch, -1)
    return Conditioning(torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": times})


class TextEncoders(torch.nn.Module):
    """A family's text encoders as one module, token ids (one tensor per tokenizer) in, conditioning out as a tuple
    (states, and for SDXL pooled embedding and time ids): what DDP/DeepSpeed wrap when the encoders train.

    Encoders are held by their pipeline component names (`encoders.text_encoder_2.*`), so trained weights map
    back onto a pipeline by name."""

    def __init__(self, family: Family, encoders: list, resolution: int, source_size: tuple[int, int] = SKETCHY_SIZE):
        super().__init__()
        self.family, self.resolution, self.source_size = family, resolution, source_size
        self.encoders = torch.nn.ModuleDict(dict(zip(family.text_encoders, encoders)))

    def forward(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cond = encode_prompt_ids(self.family, list(self.encoders.values()), ids, self.resolution, self.source_size)
        return (cond.states, cond.added["text_embeds"], cond.added["time_ids"]) if cond.added else (cond.states,)

    def train_what_conditions(self) -> None:
        """Make every weight that shapes the conditioning trainable, and only those.

        SDXL reads the penultimate layer of each encoder and the pooled embedding of the last one only, so the
        other encoders' last layer and final norm never get a gradient. Left trainable, one process skips them
        while DeepSpeed applies weight decay to their zero gradients (the runs part ways), and DDP's reducer
        waits for their gradients.
        """
        encoders = list(self.encoders.values())
        for encoder in encoders:
            encoder.requires_grad_(True)
        if self.family.pooled:
            for encoder in encoders[:-1]:
                transformer = getattr(encoder, "text_model", encoder)  # transformers < 5 nests it
                transformer.encoder.layers[-1].requires_grad_(False)
                transformer.final_layer_norm.requires_grad_(False)

    @staticmethod
    def conditioning(output: tuple[torch.Tensor, ...]) -> Conditioning:
        """The forward's tuple as the UNet's conditioning."""
        return Conditioning(output[0], {"text_embeds": output[1], "time_ids": output[2]} if len(output) > 1 else None)


def generation_kwargs(pipe, source_size: tuple[int, int] = SKETCHY_SIZE) -> dict:
    """Call arguments for a loaded pipeline that match training's conditioning (`Family.generation_kwargs`)."""
    return family_of_pipeline(pipe).generation_kwargs(source_size)


def load_textual_inversion(pipe, file: str) -> None:
    """Load a Textual Inversion file into a pipeline of any family.

    One embedding for the family's one encoder: diffusers' format ({token: vectors}). Several encoders: the
    community format with one tensor per encoder (SDXL's `clip_l` and `clip_g`: A1111, kohya); the token is the
    file's `token` metadata, else its name as A1111 uses it. A file holding other tensors is refused (an SD 1.x
    embedding given to SDXL would fit the first encoder only).
    """
    family = family_of_pipeline(pipe)
    if not family.embedding_keys:
        pipe.load_textual_inversion(file)
        return
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in keys & set(family.embedding_keys)}
    if set(tensors) != set(family.embedding_keys):
        raise UserError(f"{file} holds {', '.join(sorted(keys)) or 'nothing'}: not a {family.name} embedding (an SD 1.x "
                        f"embedding holds one tensor named by its token); a {family.name} model needs {' and '.join(repr(k) for k in family.embedding_keys)} tensors "
                        "(one per text encoder)")
    token = metadata.get("token") or Path(file).stem
    for key, encoder, tokenizer in zip(family.embedding_keys, family.text_encoders, family.tokenizers):
        pipe.load_textual_inversion(tensors[key], token=token, text_encoder=getattr(pipe, encoder),
                                    tokenizer=getattr(pipe, tokenizer))
