"""The model card: `README.md` in a run's output folder, as the hub and a reader of the folder see it: the base model,
the data, the settings that differ from the trainer's defaults, the metrics with their 95% intervals, the last
validation mosaic, and how to load the result."""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import Any

from sketch2real.cli import as_dict, options_affecting
from sketch2real.family import Family, pipeline_class
from sketch2real.lokr import LOKR_FILE

CARD = "README.md"
# metrics.json keys shown, in this order, with their `_ci95` where the run has one
CARD_METRICS = ("heldout_loss", "validation_sketchiness", "validation_content_accuracy", "conditioning_gain",
                "final_loss", "steps", "samples_per_second", "peak_memory_mb", "num_processes", "num_nodes",
                "mixed_precision")
DATA_OPTIONS = ("shard_dir", "split", "instance_category", "categories", "instance_image_type", "instance_data_dir",
                "train_data_dir", "num_instance_images", "instance_prompt", "captions", "prompt_template",
                "placeholder_token", "resolution")


def output_kind(out: Path) -> str:
    """What a run left in `out`: lora, lokr, embeddings, controlnet or pipeline (a full model)."""
    if (out / "pytorch_lora_weights.safetensors").is_file():
        return "lora"
    if (out / LOKR_FILE).is_file():
        return "lokr"
    if (out / "learned_embeds.safetensors").is_file():
        return "embeddings"
    if (out / "model_index.json").is_file():
        return "pipeline"
    return "controlnet"


def changed_options(opts) -> dict[str, Any]:
    """The options of a run that differ from its trainer's defaults (paths and how it ran left out)."""
    from sketch2real.training.checkpoints import defaults_in_context

    changed = {}
    runtime = options_affecting(type(opts), "runtime")
    defaults = defaults_in_context(opts)  # a default resolved from other options (the learning rate) is a default
    for f in dataclasses.fields(opts):
        default = defaults[f.name]
        value = getattr(opts, f.name)
        if f.name not in runtime and f.name not in DATA_OPTIONS and value != default and f.name != \
                "pretrained_model_name_or_path":
            changed[f.name] = value
    return changed


def _value(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return f"`{value}`" if isinstance(value, (str, list)) else str(value)


def _interval(ci95: Any) -> str:
    if not ci95 or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci95):
        return ""
    return f"[{ci95[0]:.4g}, {ci95[1]:.4g}]"


def usage(kind: str, base: str, out: Path, prompt: str, family: Family, repo_id: str | None = None, vae: str = "",
          subfolder: str = "") -> str:
    """How to generate with the result, with a prompt that uses what was trained (`prompt`; ControlNet: its
    template): this project's command, and the lines of plain diffusers (but for LoKr, which diffusers cannot load),
    with the run's other VAE (`vae`) and the call arguments of the family's training conditioning (SDXL's original
    size, SD3's prompt length). `repo_id`: the hub repository the result is pushed to, which the lines then load from;
    `subfolder`: the result's folder in it (a sequential run's stage)."""
    local = out
    if repo_id:  # the command reads a local folder: the repository downloaded into one
        out = Path(repo_id.split("/")[-1]) / subfolder
    embeds = str(out / "learned_embeds.safetensors")
    # the shell's quoting (a prompt with both quotes, a backslash or `$`, a folder with a space broke Python's repr)
    q_out, q_base = shlex.quote(str(out)), shlex.quote(str(base))
    generate = {"lora": f"--pretrained_model_name_or_path {q_out}", "lokr": f"--pretrained_model_name_or_path {q_out}",
                "embeddings": f"--pretrained_model_name_or_path {q_base} --textual_inversion {shlex.quote(embeds)}",
                "pipeline": f"--pretrained_model_name_or_path {q_out}",
                "controlnet": f"--pretrained_model_name_or_path {q_base} --controlnet {q_out} --shard_dir SHARDS"}[kind]
    prompts = f"--prompt_template {shlex.quote(prompt)}" if kind == "controlnet" else f"--prompts {shlex.quote(prompt)}"
    q_root = shlex.quote(repo_id.split("/")[-1]) if repo_id else ""
    include = f" --include {shlex.quote(subfolder + '/*')}" if subfolder else ""
    download = [f"hf download {repo_id}{include} --local-dir {q_root}"] if repo_id else []
    lines = ["```bash", *download, f"python infer/generate.py {generate} {prompts} --output_dir generated", "```"]
    tokens = kind == "embeddings" or (kind == "lora" and (local / "learned_embeds.safetensors").is_file())
    source = repo_id or str(out)  # diffusers' loaders take a hub id as they take a folder
    in_folder = f", subfolder={subfolder!r}" if repo_id and subfolder else ""
    # a base loaded beside the result gets the run's other VAE (a saved pipeline holds it already)
    with_vae = ", vae=vae" if vae and kind != "pipeline" else ""
    imports, code = ["DiffusionPipeline"], [f"pipe = DiffusionPipeline.from_pretrained({base!r}{with_vae})"]
    if kind == "pipeline" and in_folder:  # a pipeline loads from no subfolder of a repository: its files, then them
        code = [f"folder = snapshot_download({repo_id!r}, allow_patterns=[{subfolder + '/*'!r}])",
                f"pipe = DiffusionPipeline.from_pretrained(f'{{folder}}/{subfolder}')"]
    elif kind == "pipeline":
        code = [f"pipe = DiffusionPipeline.from_pretrained({source!r})"]
    elif kind == "lora":
        # a hub id read from the cache alone (HF_HUB_OFFLINE=1, as on compute nodes) needs the file's name
        code.append(f"pipe.load_lora_weights({source!r}{in_folder}, weight_name='pytorch_lora_weights.safetensors')"
                    if repo_id else f"pipe.load_lora_weights({source!r})")
    elif kind == "controlnet":
        pipeline = pipeline_class(family, controlnet=True).__name__
        imports = [family.controlnet_class, pipeline]
        code = [f"controlnet = {family.controlnet_class}.from_pretrained({source!r}{in_folder})",
                f"pipe = {pipeline}.from_pretrained({base!r}, controlnet=controlnet{with_vae})"]
    elif kind != "embeddings":  # LoKr: no diffusers loader reads it
        return "\n".join([*lines, "", f"`{LOKR_FILE}` is in LyCORIS' names: ComfyUI, A1111 and kohya's scripts load it; "
                          "diffusers' `load_lora_weights` reads no LoKr file (the command above merges it as ComfyUI does)."])
    if tokens:  # the trained tokens' rows in each embedding encoder (SDXL: both), as the family's files name them
        embeds_code = (f"hf_hub_download({repo_id!r}, 'learned_embeds.safetensors'{in_folder})" if repo_id
                       else repr(embeds))
        embeds_imports, embeds_lines = embedding_lines(family, local / "learned_embeds.safetensors", embeds_code)
        code += embeds_lines
    condition = f", {family.control_image_argument}=sketch" if kind == "controlnet" else ""
    prompt_line = prompt.format(category="cat") if kind == "controlnet" else prompt
    if kind == "controlnet":  # as it trained (`sketchy.sketch_condition`): a Sketchy sketch is black strokes on white
        code += ["# black strokes on white (a transparent background as the white page), then inverted, white strokes",
                 "# on black, as the ControlNet trained on it",
                 "page = load_image('a sketch.png', convert_method=lambda image: image.convert('RGBA'))",
                 "sketch = ImageOps.invert(Image.alpha_composite(Image.new('RGBA', page.size, 'white'), page).convert('RGB'))"]
    prompt_code = repr(spelled_prompt(family, local / "learned_embeds.safetensors", prompt_line) if tokens else prompt_line)
    # generate.py's guidance and the conditioning training used (SDXL's sizes): the image generate.py draws
    settings = "".join(f", {k}={v!r}" for k, v in family.pipeline_call_defaults().items())
    # by name: FLUX.2 [klein]'s pipeline takes an image first
    code.append(f"image = pipe(prompt={prompt_code}{condition}{settings}).images[0]")
    if with_vae:  # the family's VAE class (FLUX.2 [klein]'s is not AutoencoderKL: its pipeline failed at the first call)
        imports.append(family.vae_class)
        code.insert(0, f"vae = {family.vae_class}.from_pretrained({vae!r})")
    header = [f"from diffusers import {', '.join(sorted(imports))}"]
    header += ["from diffusers.utils import load_image", "from PIL import Image, ImageOps"] if kind == "controlnet" else []
    if tokens:
        header += embeds_imports
        header += ["from huggingface_hub import hf_hub_download"] if repo_id else []
    if kind == "pipeline" and in_folder:
        header += ["from huggingface_hub import snapshot_download"]
    return "\n".join([*lines, "", "```python", *header, "", *code, "```"])


def embedding_lines(family: Family, file: Path, file_code: str) -> tuple[list[str], list[str]]:
    """(imports, lines) loading a run's `learned_embeds.safetensors` (`file`; `file_code`: how the lines name it) with
    diffusers' own loader, as `sketch2real.family.load_textual_inversion` does: the file whole where the family has one
    encoder, else each encoder's tensor into its encoder (SDXL: clip_l and clip_g; FLUX.1: CLIP, and T5 where the file
    has its rows). SD3's pipelines have no loader: the rows are added to each tokenizer and encoder by transformers'
    own calls, under diffusers' names (`spelled_prompt` spells them out in the prompt)."""
    if not family.embedding_keys:
        return [], [f"pipe.load_textual_inversion({file_code})"]
    from sketch2real.family import embedding_file, placeholder_tokens

    keys, token, tensors = embedding_file(str(file), family.learned_embedding_keys(optional=True))
    learned = family.learned_embedding_keys(optional=family.optional_embedding_key in keys)
    lines = [f"embeddings = load_file({file_code})"]
    if family.loads_textual_inversion:
        lines += [f"pipe.load_textual_inversion(embeddings[{key!r}], token={token!r}, text_encoder=pipe.{encoder}, "
                  f"tokenizer=pipe.{tokenizer})" for key, encoder, tokenizer in zip(learned, family.text_encoders, family.tokenizers)]
        return ["from safetensors.torch import load_file"], lines
    names = placeholder_tokens(token, tensors[learned[0]].reshape(-1, tensors[learned[0]].shape[-1]).shape[0])
    pairs = ", ".join(f"({key!r}, pipe.{tokenizer}, pipe.{encoder})"
                      for key, encoder, tokenizer in zip(learned, family.text_encoders, family.tokenizers))
    lines += [f"tokens = {names!r}  # each row its own token, spelt out in the prompt (SD3's pipelines expand none)",
              f"for key, tokenizer, encoder in [{pairs}]:",
              "    tokenizer.add_tokens(tokens)",
              "    encoder.resize_token_embeddings(len(tokenizer))",
              "    rows = encoder.get_input_embeddings().weight.data",
              "    rows[tokenizer.convert_tokens_to_ids(tokens)] = embeddings[key].reshape(len(tokens), -1).to(rows.dtype)"]
    return ["from safetensors.torch import load_file"], lines


def spelled_prompt(family: Family, file: Path, prompt: str) -> str:
    """`prompt` with a multi-vector token spelt out (`<s0>` -> `<s0> <s0>_1`) where the family's pipelines have no
    Textual Inversion loader to expand it (SD3), as training spelt it; else as it is."""
    if family.loads_textual_inversion or not family.embedding_keys:
        return prompt
    from sketch2real.family import embedding_file, spell_out

    key = family.learned_embedding_keys()[0]
    _, token, tensors = embedding_file(str(file), [key])
    return spell_out(prompt, token, tensors[key].reshape(-1, tensors[key].shape[-1]).shape[0])


def front_matter(base: str, trainer: str, tags: list[str]) -> str:
    """A card's YAML front matter, as the hub reads it: the base model (a hub id; a local path is left out), the
    library and the tags."""
    from huggingface_hub import ModelCardData

    tags = ["sketch2real", "sketchy", trainer.replace("_", "-"), "text-to-image", "diffusers", *tags]
    return ModelCardData(base_model=None if Path(base).exists() else base, library_name="diffusers", tags=tags).to_yaml()


def model_card(opts, trainer: str, summary: dict[str, Any], out: Path, family: Family, prompt: str,
               repo_id: str | None = None, subfolder: str = "") -> str:
    """The card's markdown (YAML front matter as the hub reads it); `prompt`: one that uses what was trained;
    `repo_id`: the hub repository it is pushed to (the lines of its use load from there), `subfolder` its folder there
    (a sequential run's stage)."""

    base, kind = opts.pretrained_model_name_or_path, output_kind(out)
    front = front_matter(base, trainer, (["lora"] + (["dora"] if getattr(opts, "use_dora", False) else []) if kind == "lora"
                                         else []) + (["lycoris", "lokr"] if kind == "lokr" else []))
    from sketch2real.training.loop import effective_learning_rate

    options, processes = as_dict(opts), int(summary.get("num_processes") or 1)
    batch = opts.train_batch_size * opts.gradient_accumulation_steps * processes  # what a step averages over
    lines = [f"---\n{front}\n---", "", f"# {trainer.replace('_', ' ')} of {base} on Sketchy ({kind})", "",
             f"Trained with sketch2real's `train/{trainer}.py` for {summary.get('steps')} steps on "
             f"{processes} process(es), {summary.get('mixed_precision')} mixed precision, a global batch of {batch} "
             f"({opts.train_batch_size} per process x {opts.gradient_accumulation_steps} accumulated) at learning rate "
             f"{effective_learning_rate(opts, processes):.4g} ({opts.optimizer}).", "",
             "## Data", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {_value(options[k])} |" for k in DATA_OPTIONS if options.get(k) not in (None, "", [], 0)]
    lines += ["", "## Settings (those not at the trainer's defaults)", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in changed_options(opts).items()] or ["| (all defaults) | |"]
    lines += ["", "## Metrics (at the last step; 95% intervals over the held-out samples or images)", "",
              "| metric | value | 95% interval |", "|---|---:|---|"]
    lines += [f"| {k} | {_value(summary[k])} | {_interval(summary.get(f'{k}_ci95'))} |" for k in CARD_METRICS
              if summary.get(k) is not None]
    mosaics = sorted((out / "validation").glob("step-*.png"))
    if mosaics:
        lines += ["", "## Samples (the last validation)", "", f"![validation images]({mosaics[-1].relative_to(out)})"]
    lines += ["", "## Use", "", usage(kind, base, out, prompt, family, repo_id, opts.pretrained_vae_model_name_or_path,
                                      subfolder), ""]
    return "\n".join(lines)
