"""Data-parallel image generation from captions, templates or prompts: `accelerate launch infer/generate.py --help`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sketch2real.cli import as_dict, parse_options, run_main
from sketch2real.family import family_of_pipeline, native_size, spell_out_tokens
from sketch2real.generation import (
    CONFIG,
    SHARDS_DATA,
    WEIGHTS_DATA,
    build_items,
    generate_batch,
    image_path,
    load_generation_pipeline,
    merge_index,
    rank_batches,
    resumable_keys,
    trained_on_own_images,
    trained_sequence_length,
    trained_vae,
    weights_data,
    write_image,
    write_mosaics,
)
from sketch2real.generation import GenerateOptions as Options
from sketch2real.io import append_jsonl, write_json
from sketch2real.models import check_precision_fits, dtype_for
from sketch2real.shards import CorruptSample, ShardSamples, corrupt_samples, shards_data
from sketch2real.sketchy import sketch_condition
from sketch2real.training.diffusion import derive_seed
from sketch2real.training.preemption import PREEMPTED_EXIT_CODE, RERUN, clear_preempted, mark_preempted, preemption

logger = logging.getLogger("sketch2real")


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
    opts.check()
    preemption.install()  # from here a signal (Slurm's warning) stops the job at the next batch
    items = build_items(opts)
    for item in items:  # every key is checked before any image is written
        image_path(Path(opts.output_dir), item.key)
    state = distributed_state(opts.ddp_timeout)
    check_shared_folder(state, opts.output_dir)
    check_precision_fits(opts.mixed_precision, state.device)
    out = Path(opts.output_dir)
    # the options, and what the weights' paths and the shards hold (retrained or rebuilt in place: another run)
    config = {**as_dict(opts), WEIGHTS_DATA: weights_data(opts), SHARDS_DATA: shards_data(opts.shard_dir, opts.split)}
    done = resumable_keys(out, config, items)  # another run's images are refused here, before any model loads
    # the prompts' length the model was trained with (SD3, FLUX: T5's), unless given
    trained = [opts.pretrained_model_name_or_path, opts.lora, opts.controlnet, *opts.textual_inversion]
    length = opts.max_sequence_length or trained_sequence_length(trained)
    pipe = load_generation_pipeline(
        opts.pretrained_model_name_or_path, state.device, dtype_for(opts.mixed_precision), opts.scheduler,
        opts.textual_inversion, opts.lora, opts.lora_scale, opts.controlnet, opts.safety_checker,
        opts.enable_xformers_memory_efficient_attention, opts.torch_compile, opts.revision, (opts.height, opts.width),
        length, opts.pretrained_vae_model_name_or_path or trained_vae(trained),
    )
    settings = {k: getattr(opts, k) for k in ("height", "width", "num_inference_steps", "guidance_scale", "negative_prompt",
                                              "scheduler", "lora_scale")}
    used = family_of_pipeline(pipe).with_max_sequence_length(length).max_sequence_length
    if used is not None:  # what the index records: the length used
        settings["max_sequence_length"] = used
    if opts.guidance_scale is None:
        settings["guidance_scale"] = family_of_pipeline(pipe).guidance_scale
    if trained_on_own_images(trained):  # SDXL: the time ids of the drawn size, as its folder's images trained
        settings["own_images"] = True
    for side in ("height", "width"):  # what the index records: the size the images have
        settings[side] = settings[side] or native_size(pipe)
    sketches = None
    if opts.controlnet:
        sketches = ShardSamples(opts.shard_dir, opts.split, fields=("sketch",), resolution=settings["height"], as_tensor=False)
        position = {ref.key: i for i, ref in enumerate(sketches.refs)}
        # each sketch still to draw from decoded once (it was once per item, every start: 21 min a rank at 75k items),
        # and the same list on every rank (`done` is read from the same folder)
        todo = {it.sample_key for it in items if it.key not in done}
        readable = {key for key in todo if readable_sketch(sketches, position[key])}
        items = [it for it in items if it.sample_key in readable or it.sample_key not in todo]
    batches = [b for b in rank_batches(items, opts.batch_size, state.process_index, state.num_processes)
               if any(it.key not in done for it in b)]
    model = {"model": opts.pretrained_model_name_or_path, "textual_inversion": opts.textual_inversion, "lora": opts.lora,
             "controlnet": opts.controlnet}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, config)
        clear_preempted(out)
    state.wait_for_everyone()
    part = out / f"index.rank{state.process_index:03d}.jsonl"
    todo = sum(len(b) for b in batches)
    drawn_now = len({it.key for it in items} - done)  # by every rank
    bar = tqdm(total=todo, desc=f"generate [rank {state.process_index}]", unit="img", disable=not state.is_local_main_process)
    start = time.perf_counter()
    for done_batches, batch in enumerate(batches):
        if preemption:  # what is written stays; the requeued job skips it
            bar.close()
            drawn_here = sum(len(b) for b in batches[:done_batches])  # (not the bar's: only rank 0's counts)
            mark_preempted(state, out, f"generation stopped: rank {state.process_index} after {drawn_here} of its {todo} "
                           "images", RERUN)
            return PREEMPTED_EXIT_CODE
        conditioning = [sketch_condition(sketches[position[it.sample_key]]["sketch"]) for it in batch] if sketches else None
        images = generate_batch(pipe, batch, opts.seed, settings, conditioning)
        rows = []
        for item, image in zip(batch, images):
            if item.key not in done:
                write_image(out, item.key, image)
            # SD3's pipelines have no TI loader: they got the prompt with its tokens spelt out, which redraws it
            spelt = spell_out_tokens(pipe, item.prompt)
            rows.append({"key": item.key, "category": item.category, "prompt": item.prompt,
                         **({"pipeline_prompt": spelt} if spelt != item.prompt else {}), "sample_key": item.sample_key,
                         "seed": opts.seed, "generator_seed": derive_seed(opts.seed, item.key), "image": str(image_path(out, item.key).relative_to(out)), **model,
                         "settings": settings, **item.extra})
        append_jsonl(part, rows)
        bar.update(len(batch))
        bar.set_postfix(img_s=f"{bar.n / (time.perf_counter() - start):.2f}")
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        rows = merge_index(out)
        missing = len({it.key for it in items} - {r["key"] for r in rows})
        beyond = len({r["key"] for r in rows} - {it.key for it in items})
        if beyond:  # an earlier run's of the same settings with more items: the folder (and eval of it) holds them
            logger.warning("%s holds %d image(s) beyond this run's %d (an earlier run's of the same settings, with other "
                           "--categories/--max_samples): index.jsonl lists them and eval/fid.py scores them; give this "
                           "subset another --output_dir to score it alone", out, beyond, len(items))
        mosaics = write_mosaics(out, rows, opts.shard_dir, opts.split, cell=min(settings["height"], 256), max_rows=opts.mosaic_rows)
        summary = {"images": len(rows), "generated_now": drawn_now, "missing": missing, "beyond_this_run": beyond,
                   "index": str(out / "index.jsonl"),
                   "mosaics": [str(m) for m in mosaics], "corrupt_samples": corrupt_samples.summary(),
                   "num_processes": state.num_processes, "dtype": str(getattr(pipe, family_of_pipeline(pipe).denoiser).dtype)}
        write_json(out / "metrics.json", summary)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
