"""Batched, data-parallel captioning of sketches with BLIP-2 or LLaVA: `accelerate launch infer/caption.py --help`."""

from __future__ import annotations

import time
from pathlib import Path

from sketch2real.captioning import (
    CONFIG,
    MODEL_DATA,
    SHARDS_DATA,
    format_quality,
    load_captioner,
    merge_captions,
    quality_report,
    resolve_prompts,
    resumable_pairs,
)
from sketch2real.captioning import CaptionOptions as Options
from sketch2real.cli import UserError, as_dict, parse_options, run_main
from sketch2real.io import append_jsonl, atomic_path, write_json
from sketch2real.models import check_precision_fits, dtype_for, local_model_identity
from sketch2real.shards import shards_data
from sketch2real.training.preemption import PREEMPTED_EXIT_CODE, RERUN, clear_preempted, mark_preempted, preemption


def _read_image(path: Path):
    """The image at `path`, or None (counted as corrupt) where it cannot be read."""
    from sketch2real.shards import CorruptSample, corrupt_samples, open_image

    try:
        return open_image(path)
    except CorruptSample as err:
        corrupt_samples.record(err)
        return None


def _folder_items(folder: str, rank: int, world: int, categories: list[str]) -> list[dict]:
    """This rank's images of `folder` as {key, category, path}, read when their batch comes (all of them decoded
    up front held every image in memory: ~19 GB for Sketchy's 75k sketches)."""
    from sketch2real.shards import image_files

    root = Path(folder)
    files = image_files(root, recursive=True)
    if categories:  # a category is an image's folder, as with shards: unknown ones are an error
        present = {p.parent.name for p in files if p.parent != root}
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise UserError(f"unknown category {unknown[0]!r} in {folder}; its folders: {', '.join(sorted(present)) or 'none'}")
        files = [p for p in files if p.parent != root and p.parent.name in categories]
    stems: dict[Path, Path] = {}
    for p in files:  # an image's key is its path without the suffix: two files of one name would share their captions
        twin = stems.setdefault(p.with_suffix(""), p)
        if twin != p:
            raise UserError(f"{twin} and {p} would both be captioned as {p.relative_to(root).with_suffix('')}: rename one")
    mine = files[rank * len(files) // world : (rank + 1) * len(files) // world]
    return [{"key": str(p.relative_to(root).with_suffix("")), "category": p.parent.name if p.parent != root else "",
             "path": p} for p in mine]


def _batches(opts: Options, rank: int, world: int):
    """This rank's batches: lists of {key, category, image, pad}. Bad input fails here, before any work."""
    if opts.image_dir:
        items = _folder_items(opts.image_dir, rank, world, opts.categories)

        def read(batch: list[dict]) -> list[dict]:
            images = [_read_image(item["path"]) for item in batch]
            return [{**item, "image": image, "pad": image is None} for item, image in zip(batch, images)]

        return (read(items[i : i + opts.batch_size]) for i in range(0, len(items), opts.batch_size))
    from sketch2real.shards import ShardStream, corrupt_samples, stream_loader

    stream = ShardStream(opts.shard_dir, opts.split, fields=(opts.image_field,), categories=opts.categories or None,
                         rank=rank, world_size=world, as_tensor=False)
    if len(stream.refs) == 0:
        raise UserError(f"no samples to caption in split {opts.split!r} of {opts.shard_dir}")
    def items(batch: dict) -> list[dict]:
        corrupt_samples.merge(batch["corrupt_entries"])  # what the DataLoader workers met: counted in metrics.json
        return [{"key": k, "category": c, "image": im, "pad": bool(p)}
                for k, c, im, p in zip(batch["key"], batch["category"], batch[opts.image_field], batch["pad"].tolist())]

    return (items(batch) for batch in stream_loader(stream, opts.batch_size, opts.num_workers))


def main() -> int:
    from tqdm.auto import tqdm

    from sketch2real.training.accelerator import check_shared_folder, distributed_state

    opts = parse_options(Options)
    opts.check()
    preemption.install()  # from here a signal (Slurm's warning) stops the job at the next batch
    prompts = resolve_prompts(opts.prompts)
    state = distributed_state(opts.ddp_timeout)
    check_shared_folder(state, opts.output_dir)
    check_precision_fits(opts.mixed_precision, state.device)
    out = Path(opts.output_dir)
    config = {**as_dict(opts), SHARDS_DATA: shards_data(opts.shard_dir, opts.split),
              MODEL_DATA: local_model_identity(opts.model_name_or_path)}
    done = resumable_pairs(out, config)  # another run's captions are refused here, before the model loads
    batches = _batches(opts, state.process_index, state.num_processes)  # so are bad categories, folders, shards
    captioner = load_captioner(opts.model_name_or_path, state.device, dtype_for(opts.mixed_precision), opts.load_in_8bit,
                               opts.load_in_4bit, opts.trust_remote_code)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, config)
        clear_preempted(out)
    state.wait_for_everyone()
    part = out / f"captions.rank{state.process_index:03d}.jsonl"
    settings = {"max_new_tokens": opts.max_new_tokens, "num_beams": opts.num_beams, "do_sample": False}
    bar = tqdm(desc=f"caption [rank {state.process_index}]", unit="img", disable=not state.is_local_main_process)
    start, count = time.perf_counter(), 0
    for batch in batches:
        if preemption:  # what is written stays; the requeued job skips it
            bar.close()
            mark_preempted(state, out, f"captioning stopped after {count} images", RERUN)
            return PREEMPTED_EXIT_CODE
        pairs = [(item, pid) for item in batch if not item["pad"] for pid in prompts if (item["key"], pid) not in done]
        if pairs:
            captions, truncated = captioner.generate([item["image"] for item, _ in pairs], [prompts[pid] for _, pid in pairs],
                                                     opts.max_new_tokens, opts.num_beams)
            append_jsonl(part, [
                {"key": item["key"], "category": item["category"], "prompt_id": pid, "prompt": prompts[pid], "caption": caption,
                 "truncated": cut, "model": opts.model_name_or_path, "settings": settings}
                for (item, pid), caption, cut in zip(pairs, captions, truncated)
            ])
        count += sum(not item["pad"] for item in batch)
        bar.update(sum(not item["pad"] for item in batch))
        bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.2f}")
    bar.close()
    from sketch2real.shards import corrupt_samples

    corrupt = corrupt_samples.gathered(state)  # a collective: also every rank's wait for the others' part files
    if state.is_main_process:
        rows = merge_captions(out)
        report = quality_report(rows)
        write_json(out / "metrics.json", {"captions": len(rows), "corrupt_samples": corrupt_samples.summary(corrupt),
                                          "num_processes": state.num_processes, "dtype": str(captioner.model.dtype)})
        write_json(out / "quality.json", report)
        with atomic_path(out / "quality.md") as tmp:
            tmp.write_text(format_quality(report))
        print(format_quality(report), end="")
        print(f"{len(rows)} captions in {out / 'captions.jsonl'}")
        if corrupt:
            print(f"{len(corrupt)} corrupt images skipped, not captioned (listed in {out / 'metrics.json'})")
    return 0


if __name__ == "__main__":
    run_main(main)
