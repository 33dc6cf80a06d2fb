"""Data-parallel image generation from captions, templates or prompts: `accelerate launch infer/generate.py --help`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sketch2real.cli import UserError, as_dict, check_output_dir, option, parse_options, run_main
from sketch2real.generation import (
    SCHEDULERS,
    expand,
    finished_keys,
    generate_batch,
    image_path,
    items_from_captions,
    items_from_prompts,
    items_from_template,
    load_generation_pipeline,
    merge_index,
    rank_batches,
    write_image,
    write_mosaics,
)
from sketch2real.io import append_jsonl, write_json
from sketch2real.models import dtype_for
from sketch2real.shards import CorruptSample, ShardSamples, corrupt_samples
from sketch2real.sketchy import sketch_condition


@dataclass(kw_only=True, frozen=True)
class Options:
    """Generate images for every item (caption, template x split sample, or prompt), resumably and data-parallel."""

    pretrained_model_name_or_path: str = option("", help="base model or a DreamBooth output (a pipeline, or LoRA weights on their base): hub id or folder (required)")
    revision: str | None = option(None, help="model revision on the hub")
    output_dir: str = option("", help="images/, index.jsonl and mosaics/ go here (required)")
    ddp_timeout: int = option(7200, help="seconds a process waits for the others (e.g. behind rank 0's final merge) "
                              "before the job fails", min=1)
    textual_inversion: list[str] = option([], help="learned_embeds.safetensors file(s) to load")
    lora: str = option("", help="folder or file of LoRA weights (pytorch_lora_weights.safetensors)")
    lora_scale: float = option(1.0, help="LoRA strength (0: off)", min=0)
    controlnet: str = option("", help="a trained ControlNet folder: each item is conditioned on its sketch")
    captions: str = option("", help="captions JSONL from infer/caption.py (one image per row)")
    prompt_ids: list[str] = option([], help="only these prompt ids of --captions")
    prompt_template: str = option("", help="template over the samples of --split: {category}, {key}, {caption}")
    prompts: list[str] = option([], help="plain prompts")
    shard_dir: str = option("", help="shards (for --prompt_template items, mosaics and --controlnet sketches)")
    split: str = option("test", help="split whose samples the template covers")
    categories: list[str] = option([], help="only these categories")
    max_per_category: int = option(0, help="at most this many samples per category (0: all)", min=0)
    num_images_per_prompt: int = option(1, help="images per item", min=1)
    negative_prompt: str = option("", help="negative prompt")
    scheduler: str = option("", help="sampling scheduler ('': the model's own)", choices=("", *SCHEDULERS))
    num_inference_steps: int = option(50, help="denoising steps", min=1)
    guidance_scale: float = option(7.5, help="classifier-free guidance scale (<= 1: no guidance)", min=0)
    height: int = option(512, help="image height in pixels", min=8, multiple_of=8)
    width: int = option(512, help="image width in pixels", min=8, multiple_of=8)
    batch_size: int = option(8, help="images per batch per process", min=1)
    seed: int = option(0, help="global seed: each image's seed derives from it and the item's key only", min=0)
    mixed_precision: str = option("no", help="no, fp16 or bf16 (fp16 needs CUDA)", choices=("no", "fp16", "bf16"))
    safety_checker: bool = option(False, help="run the safety checker (off by default: it blackens sketches)")
    enable_xformers_memory_efficient_attention: bool = option(False, help="xformers attention (CUDA only)")
    torch_compile: bool = option(False, help="torch.compile the UNet")
    mosaic_rows: int = option(8, help="rows per category mosaic", min=1)


def build_items(opts: Options):
    sources = [bool(opts.captions), bool(opts.prompt_template and not opts.captions), bool(opts.prompts)]
    if sum(sources) != 1:
        raise UserError("give exactly one of --captions, --prompt_template (with --shard_dir) or --prompts")
    if opts.captions:
        items = items_from_captions(opts.captions, opts.prompt_ids, opts.prompt_template or "{caption}")
        if opts.categories:
            items = [it for it in items if it.category in set(opts.categories)]
    elif opts.prompt_template:
        if not opts.shard_dir:
            raise UserError("--prompt_template needs --shard_dir")
        items = items_from_template(opts.prompt_template, opts.shard_dir, opts.split, opts.categories or None,
                                    opts.max_per_category)
    else:
        items = items_from_prompts(opts.prompts)
    if opts.controlnet and not all(it.sample_key for it in items):
        raise UserError("--controlnet conditions each image on its sketch: use --prompt_template or --captions with --shard_dir")
    return expand(items, opts.num_images_per_prompt)


def readable_sketch(sketches: ShardSamples, index: int) -> bool:
    """Whether a ControlNet conditioning sketch decodes (a corrupt one is counted and its images left out)."""
    try:
        sketches.read(index)
    except CorruptSample as err:
        corrupt_samples.record(err, "its images are not generated")
        return False
    return True


def main() -> int:
    from tqdm.auto import tqdm

    from sketch2real.training.accelerator import check_shared_folder, distributed_state

    opts = parse_options(Options)
    if not opts.pretrained_model_name_or_path or not opts.output_dir:
        raise UserError("--pretrained_model_name_or_path and --output_dir are required")
    items = build_items(opts)
    check_output_dir(opts.output_dir)
    for item in items:  # every key is checked before any image is written
        image_path(Path(opts.output_dir), item.key)
    state = distributed_state(opts.ddp_timeout)
    check_shared_folder(state, opts.output_dir)
    if state.device.type != "cuda" and opts.mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16 needs a CUDA device; use bf16 or no on CPU")
    out = Path(opts.output_dir)
    done = finished_keys(out) if out.is_dir() else set()
    sketches = None
    if opts.controlnet:
        sketches = ShardSamples(opts.shard_dir, opts.split, fields=("sketch",), resolution=opts.height, as_tensor=False)
        position = {ref.key: i for i, ref in enumerate(sketches.refs)}
        items = [it for it in items if readable_sketch(sketches, position[it.sample_key])]  # the same list on every rank
    batches = [b for b in rank_batches(items, opts.batch_size, state.process_index, state.num_processes)
               if any(it.key not in done for it in b)]
    pipe = load_generation_pipeline(
        opts.pretrained_model_name_or_path, state.device, dtype_for(opts.mixed_precision), opts.scheduler,
        opts.textual_inversion, opts.lora, opts.lora_scale, opts.controlnet, opts.safety_checker,
        opts.enable_xformers_memory_efficient_attention, opts.torch_compile, opts.revision,
    )
    settings = {k: getattr(opts, k) for k in ("height", "width", "num_inference_steps", "guidance_scale", "negative_prompt",
                                              "scheduler", "lora_scale")}
    model = {"model": opts.pretrained_model_name_or_path, "textual_inversion": opts.textual_inversion, "lora": opts.lora,
             "controlnet": opts.controlnet}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "generate_config.json", as_dict(opts))
    state.wait_for_everyone()
    part = out / f"index.rank{state.process_index:03d}.jsonl"
    todo = sum(len(b) for b in batches)
    bar = tqdm(total=todo, desc=f"generate [rank {state.process_index}]", unit="img", disable=not state.is_local_main_process)
    start = time.perf_counter()
    for batch in batches:
        conditioning = [sketch_condition(sketches[position[it.sample_key]]["sketch"]) for it in batch] if sketches else None
        images = generate_batch(pipe, batch, opts.seed, settings, conditioning)
        rows = []
        for item, image in zip(batch, images):
            if item.key not in done:
                write_image(out, item.key, image)
            rows.append({"key": item.key, "category": item.category, "prompt": item.prompt, "sample_key": item.sample_key,
                         "seed": opts.seed, "image": str(image_path(out, item.key).relative_to(out)), **model,
                         "settings": settings, **item.extra})
        append_jsonl(part, rows)
        bar.update(len(batch))
        bar.set_postfix(img_s=f"{bar.n / (time.perf_counter() - start):.2f}")
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        rows = merge_index(out)
        missing = len({it.key for it in items} - {r["key"] for r in rows})
        mosaics = write_mosaics(out, rows, opts.shard_dir, opts.split, cell=min(opts.height, 256), max_rows=opts.mosaic_rows)
        summary = {"images": len(rows), "generated_now": todo, "missing": missing, "index": str(out / "index.jsonl"),
                   "mosaics": [str(m) for m in mosaics], "corrupt_samples": corrupt_samples.summary(),
                   "num_processes": state.num_processes}
        write_json(out / "metrics.json", summary)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
