"""A full-scale rehearsal: what grows with the dataset, measured on a synthetic release with Sketchy's real counts.

Sketchy: 125 categories, 12,500 photos (100 per category, 10 of them in testset.txt), 75,471 sketches, 256 px.
`--scale` takes that fraction of the categories (each with its real 100 photos), 6 sketches per photo (75,000 at
1.0; make_synthetic_sketchy takes a whole number of sketches per photo); every figure that grows with the data is
also projected to 75,471 sketches, linearly. Steps (each in its own process, so its peak RSS is its own):

1. release    data_prep/make_synthetic_sketchy.py (or --sketchy_root): time, bytes.
2. data_prep  data_prep/build_splits.py, data_prep/make_shards.py: time, peak RSS, shard bytes.
3. latents    the trainers' on-disk latent cache (`LatentStore`; the tiny SD's VAE, whose latents have SD's layout:
              4 channels, factor 8; CPU) over the train split: ControlNet's set (the photo of every sketch/photo
              pair) and Textual Inversion's (every sketch): time, bytes per image on disk, peak RSS of the process;
              projected to 512/1024 px with SD's VAE and to an 8-GPU node, beside the per-rank in-memory fp32 cache
              it replaced.
4. eval       eval/fid.py on the whole test split (reference: its photos; one "generated" set: links to the same
              photos with an index.jsonl, one per test pair) with every metric the tiny extractors run offline.
5. kid        `kid_difference` on n x 2048 float64 random features (n = 75,471 x scale, or --kid_n): time and
              traced peak memory; above --kid_full_max one block of kernel rows is timed and the whole projected.

    nice -n 10 python bench/full_scale.py --scale 0.02                     # a quick check (~6 min on 2 busy cores)
    nice -n 10 python bench/full_scale.py --scale 0.2 --kid_n 75471        # ~25 min; --scale 1.0: ~2 h here

Children run with OMP_NUM_THREADS=1 unless it is set (two threads on two busy cores ran the tiny VAE 15x slower).

Writes OUTPUT_DIR/full_scale.md, full_scale.json and logs/; the data it made (work/) is removed unless --keep_data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKETCHY = {"categories": 125, "photos": 12_500, "sketches": 75_471, "photos_per_category": 100,
           "test_photos_per_category": 10, "sketches_per_photo": 6}
STEPS = ("release", "data_prep", "latents", "eval", "kid")
RANKS = 8  # GPUs of the node the figures are projected to
MIB, GIB = 2**20, 2**30
EVAL_METRICS = ("fid", "kid", "fd_dinov2", "cmmd", "prdc", "clip_score", "clip_accuracy")


# ----------------------------------------------------------------------------- measuring


# Starts `cmd` and writes its peak RSS (KiB, descendants included) to a file. Linux keeps a process's RSS high-water
# mark across fork and exec, so a step forked from this process (torch, the tiny models: ~500 MiB) would report at
# least that much; forked from this small interpreter instead, it reports its own.
_MEASURED = ("import os, subprocess, sys\nproc = subprocess.Popen(sys.argv[2:])\n_, status, usage = os.wait4(proc.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\nsys.exit(os.waitstatus_to_exitcode(status))")


def timed_child(cmd: list, log: Path, env: dict | None = None) -> tuple[float, int]:
    """Run `cmd`; (wall seconds, peak RSS in bytes of its largest process, descendants included). Exits on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = log.with_name(log.name + ".peak_kib")
    start = time.perf_counter()
    with open(log, "w") as out:
        returncode = subprocess.run([sys.executable, "-c", _MEASURED, peak, *map(str, cmd)], stdout=out, stderr=subprocess.STDOUT,
                                    env=env).returncode
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"failed ({returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return seconds, int(peak.read_text()) * 1024


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Bytes of the files under `folder` matching `pattern` (symlinks not followed)."""
    return sum(p.lstat().st_size for p in folder.rglob(pattern) if p.is_file() and not p.is_symlink())


def _reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: clear_refs 5), so the next peak is the next step's own."""
    Path("/proc/self/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- children (run as separate processes)


def latent_child(shards: str, vae_dir: str, store_root: str, resolution: int, field: str, num_workers: int) -> dict:
    """Build a `LatentStore` over the train split as a trainer does; its figures and this process's memory."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    from sketch2real.shards import ShardSamples
    from sketch2real.training.callbacks import process_memory_bytes
    from sketch2real.training.data import LazyImages
    from sketch2real.training.latent_store import LatentStore

    fields = ("sketch", "photo") if field == "photo" else ("sketch",)  # ControlNet: the pairs; TI: the sketches
    samples = ShardSamples(shards, "train", fields=fields, resolution=resolution)
    images = LazyImages(samples, field, list(range(len(samples))))
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    accelerator = Accelerator(cpu=True)
    store = LatentStore(store_root, vae, images, accelerator.device)
    shutil.rmtree(store.folder, ignore_errors=True)  # encode everything here, reuse nothing
    rss_before = process_memory_bytes("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    store.build(accelerator, list(range(len(images))), num_workers, False, progress=False)
    seconds = time.perf_counter() - start
    peak = process_memory_bytes("VmHWM")
    eps = torch.randn(4, *store._block(0).shape[2:])
    latents = store.latents([0, 1, len(images) // 2, len(images) - 1], eps)  # read back, memory-mapped
    on_disk = folder_bytes(store.folder, "block-*.npy")
    first = np.load(store._block_file(0), mmap_mode="r")
    stored = store.stats["unique_images"]  # ControlNet's pairs name their photo: each photo is encoded once
    return {"images": len(images), "stored_images": stored, "seconds": seconds, "bytes_on_disk": on_disk,
            "bytes_per_image": on_disk / stored,
            "numbers_per_image": int(np.prod(first.shape[1:])), "latent_shape": list(latents.shape[1:]),
            "rss_before_mib": rss_before / MIB, "peak_rss_mib": peak / MIB, "peak_growth_mib": (peak - rss_before) / MIB,
            "num_workers": num_workers, "vae_factor": 2 ** (len(vae.config.block_out_channels) - 1)}


def kid_child(n: int, dims: int, full_max: int, check_n: int, seed: int) -> dict:
    """`kid_difference` on n x dims float64 normal features: whole when n <= full_max, else one timed block of kernel
    rows (the unit it repeats) and the whole projected; traced peak memory either way."""
    import tracemalloc

    import numpy as np

    from sketch2real.metrics import KERNEL_BLOCK, cubic_kernel_row_sums, kid_difference
    from sketch2real.training.callbacks import process_memory_bytes

    def features(count: int, shift: float, rng) -> np.ndarray:
        return rng.standard_normal((count, dims)) + shift

    def block_seconds(ref: np.ndarray) -> float:
        rows = ref[:KERNEL_BLOCK]
        start = time.perf_counter()
        cubic_kernel_row_sums(rows, ref)
        return time.perf_counter() - start

    def whole(count: int) -> dict:
        rng = np.random.default_rng(seed)
        a, b, ref = features(count, 0.02, rng), features(count, 0.0, rng), features(count, 0.0, rng)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        result = kid_difference(a, b, ref)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        t_block = block_seconds(ref)
        return {"n": count, "seconds": seconds, "peak_traced_mib": peak / MIB, "block_seconds": t_block,
                "projected_seconds": 5 * count / KERNEL_BLOCK * t_block, "kid_difference": result["kid_difference"]}

    out = {"n": n, "dims": dims, "block": KERNEL_BLOCK, "inputs_mib": 3 * n * dims * 8 / MIB,
           "n_by_n_matrix_gib": n * n * 8 / GIB}
    if n <= full_max:
        out["whole"] = whole(n)
    else:
        out["check"] = whole(min(check_n, n))  # the projection against a measured whole run at a smaller n
        rng = np.random.default_rng(seed)
        a, b, ref = features(n, 0.02, rng), features(n, 0.0, rng), features(n, 0.0, rng)
        held = (a, b)  # the RSS a real job holds; the block needs the reference only
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t_block = block_seconds(ref)
        out["one_block"] = {"seconds": t_block, "peak_traced_mib": (tracemalloc.get_traced_memory()[1] - base) / MIB}
        tracemalloc.stop()
        out["inputs_held"] = sum(x.nbytes for x in held) + ref.nbytes
        # kid_difference: the reference's own rows, then a-a, a-ref, b-b, b-ref: five n x n kernels, n / block blocks each
        out["projected_seconds"] = 5 * n / KERNEL_BLOCK * t_block
    out["peak_rss_mib"] = process_memory_bytes("VmHWM") / MIB
    return out


CHILDREN = {"latents": latent_child, "kid": kid_child}


def run_child(name: str, kwargs: dict, work: Path) -> tuple[dict, float, int]:
    """A child function in a fresh interpreter: (its result, wall seconds, peak RSS bytes)."""
    result_file = work.parent / "logs" / f"{name}-{hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]}.json"
    seconds, rss = timed_child([sys.executable, __file__, "--child", name, "--child_kwargs", json.dumps(kwargs),
                                "--child_result", result_file], result_file.with_suffix(".log"))
    return json.loads(result_file.read_text()), seconds, rss


# ----------------------------------------------------------------------------- steps


def make_release(root: Path, categories: list[str], log: Path) -> dict:
    seconds, rss = timed_child([sys.executable, REPO / "data_prep/make_synthetic_sketchy.py", "--output_dir", root,
                                "--categories", *categories, "--photos_per_category", SKETCHY["photos_per_category"],
                                "--sketches_per_photo", SKETCHY["sketches_per_photo"], "--test_photos_per_category",
                                SKETCHY["test_photos_per_category"], "--resolution", 256], log)
    return {"seconds": seconds, "peak_rss_mib": rss / MIB, "bytes": folder_bytes(root)}


def release_counts(root: Path) -> dict:
    from sketch2real.sketchy import SketchyRelease

    release = SketchyRelease(root)
    sketches = list(release.sketches())
    return {"categories": len(release.categories), "category_names": release.categories, "photos": len({(s.category, s.photo_id) for s in sketches}),
            "sketches": len(sketches)}


def data_prep(root: Path, work: Path) -> dict:
    splits, shards = work / "splits", work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    s_seconds, s_rss = timed_child([sys.executable, REPO / "data_prep/build_splits.py", "--sketchy_root", root,
                                    "--output_dir", splits], work.parent / "logs" / "build_splits.log")
    m_seconds, m_rss = timed_child([sys.executable, REPO / "data_prep/make_shards.py", "--splits_dir", splits,
                                    "--sketchy_root", root, "--output_dir", shards], work.parent / "logs" / "make_shards.log")
    return {"splits_seconds": s_seconds, "splits_peak_rss_mib": s_rss / MIB, "shards_seconds": m_seconds,
            "shards_peak_rss_mib": m_rss / MIB, "shard_bytes": folder_bytes(shards, "*.tar"),
            "rows": json.loads((splits / "report.json").read_text())["sketches"]}


def evaluation(root: Path, work: Path, models, categories: list[str] | None = None) -> dict:
    """eval/fid.py on the test split (of `categories`, default all); the generated set: links to the test photos, one
    per test pair, with an index.jsonl (categories, sample keys, prompts) as infer/generate.py writes."""
    from sketch2real.io import read_jsonl, write_jsonl
    from sketch2real.sketchy import category_words

    folder = work / "eval" / ("all" if categories is None else "subset")
    shutil.rmtree(folder, ignore_errors=True)
    generated = folder / "generated"
    generated.mkdir(parents=True)
    rows = []
    for i, row in enumerate(read_jsonl(work / "splits" / "test.jsonl")):
        if categories is not None and row["category"] not in categories:
            continue
        name = f"{i:06d}{Path(row['photo_path']).suffix}"
        (generated / name).symlink_to((root / row["photo_path"]).resolve())
        rows.append({"key": f"{i:06d}", "image": name, "category": row["category"], "sample_key": row["key"],
                     "prompt": f"a photo of a {category_words(row['category'])}"})
    write_jsonl(generated / "index.jsonl", rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(models.torch_home), "TOKENIZERS_PARALLELISM": "false"}
    subset = ["--categories", *categories] if categories is not None else []
    log = work.parent / "logs" / f"eval-{folder.name}.log"
    seconds, rss = timed_child([sys.executable, REPO / "eval/fid.py", "--generated", f"photos={generated}",
                                "--reference_shards", work / "shards", "--reference_split", "test", "--reference_field",
                                "photo", *subset, "--metrics", *EVAL_METRICS, "--dims", 64, "--no_cache",
                                "--dinov2_model_name_or_path", models.dinov2, "--clip_model_name_or_path", models.clip,
                                "--output_dir", folder / "out"], log, env)
    metrics = json.loads((folder / "out" / "metrics.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": rss / MIB, "generated": len(rows), "reference": metrics["reference"]["n"],
            "metrics": list(EVAL_METRICS)}


def eval_projection(small: dict, whole: dict, factor: float) -> float:
    """Seconds of the whole job at full scale: start-up + per image, fitted through the one-category and whole runs."""
    n_small, n_whole = small["reference"] + small["generated"], whole["reference"] + whole["generated"]
    if n_whole <= n_small:
        return whole["seconds"] * factor
    per_image = (whole["seconds"] - small["seconds"]) / (n_whole - n_small)
    return whole["seconds"] + per_image * n_whole * (factor - 1)


# ----------------------------------------------------------------------------- report


def human_seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def table(results: dict) -> list[str]:
    """Rows of the report: figure | measured here | full Sketchy, per rank | full Sketchy, 8-GPU node | basis."""
    from sketch2real.io import human_bytes

    f = results["projection_factor"]
    linear = f"x {f:.3f} (linear)" if abs(f - 1) > 1e-9 else "measured"
    rows = [("figure", "measured here", "full Sketchy, per rank", f"full Sketchy, {RANKS}-GPU node", "basis")]
    if "release" in results:
        r = results["release"]
        rows += [("synthetic release: time", human_seconds(r["seconds"]), human_seconds(r["seconds"] * f), "one job", linear),
                 ("synthetic release: bytes", human_bytes(r["bytes"]), human_bytes(r["bytes"] * f), "one copy", linear)]
    if "data_prep" in results:
        d = results["data_prep"]
        rows += [("build_splits: time / peak RSS", f"{human_seconds(d['splits_seconds'])} / {d['splits_peak_rss_mib']:.0f} MiB",
                  f"{human_seconds(d['splits_seconds'] * f)} / —", "one job", f"time {linear}; RSS measured only"),
                 ("make_shards: time / peak RSS", f"{human_seconds(d['shards_seconds'])} / {d['shards_peak_rss_mib']:.0f} MiB",
                  f"{human_seconds(d['shards_seconds'] * f)} / —", "one job", f"time {linear}; RSS measured only"),
                 ("shards on disk", human_bytes(d["shard_bytes"]), human_bytes(d["shard_bytes"] * f), "one copy (shared FS)",
                  linear)]
    for entry in results.get("latents", []):
        r = entry["result"]
        n_full, stored_full = r["images"] * f, r["stored_images"] * f
        here = (f"{r['images']:,} images here" if r["stored_images"] == r["images"] else
                f"{r['images']:,} pairs, {r['stored_images']:,} distinct photos here")
        label = f"latent store, {entry['set']}, {entry['resolution']} px ({here})"
        alone = r["seconds"] * f
        rows += [(f"{label}: encode time", human_seconds(r["seconds"]),
                  f"{human_seconds(alone / RANKS)} ({human_seconds(alone)} as 1 process)",
                  f"{human_seconds(alone / RANKS)} (ranks in parallel)", f"{linear}; blocks dealt to the ranks"),
                 (f"{label}: on disk", f"{human_bytes(r['bytes_on_disk'])} ({r['bytes_per_image']:.0f} B/stored image)",
                  "reads the shared copy", human_bytes(r["bytes_per_image"] * stored_full) + " (one copy)", linear),
                 (f"{label}: process peak RSS (growth while building)",
                  f"{r['peak_rss_mib']:.0f} MiB (+{r['peak_growth_mib']:.0f})", f"~{r['peak_rss_mib']:.0f} MiB",
                  f"~{r['peak_rss_mib'] * RANKS / 1024:.1f} GiB", "O(batch): measured, not scaled"),
                 (f"{label}: the old in-memory fp32 cache would hold",
                  human_bytes(r["images"] * r["numbers_per_image"] * 4), human_bytes(n_full * r["numbers_per_image"] * 4),
                  human_bytes(n_full * r["numbers_per_image"] * 4 * RANKS), "2 x C x h x w x 4 B per image, per rank")]
    for entry in results.get("latent_projection", []):
        res, n_full, disk, old = entry["resolution"], entry["images"], entry["store_bytes"], entry["old_bytes_per_rank"]
        rows += [(f"latent store, {entry['set']}, {res} px, SD VAE: on disk", "—",
                  f"encodes {entry['stored_images'] / RANKS:,.0f} images", f"{human_bytes(disk)} (one copy)",
                  f"{entry['bytes_per_number']:.3f} B per latent number (measured) x 2 x 4 x {res // 8}²"),
                 (f"old in-memory fp32 cache, {entry['set']}, {res} px", "—",
                  f"{human_bytes(old)}, encodes {n_full:,.0f}", human_bytes(old * RANKS), "2 x 4 x (res/8)² x 4 B per rank")]
    if "eval" in results:
        e = results["eval"]
        rows += [(f"eval/fid.py, test split ({e['reference']} reference + {e['generated']} generated, "
                  f"{' '.join(e['metrics'])}; --dims 64, tiny DINOv2/CLIP): time / peak RSS",
                  f"{human_seconds(e['seconds'])} / {e['peak_rss_mib']:.0f} MiB",
                  f"{human_seconds(e['projected_seconds'])} / —", "extraction splits over ranks",
                  f"start-up + per image, fitted on one category ({human_seconds(e['one_category']['seconds'])}) and "
                  f"all; RSS measured only" if abs(f - 1) > 1e-9 else "measured")]
    if "kid" in results:
        k = results["kid"]
        n = f"{k['n']:,} x {k['dims']}"
        if "whole" in k:
            w = k["whole"]
            rows += [(f"kid_difference, {n} float64: time", human_seconds(w["seconds"]), "rank 0 only", "—", "measured"),
                     (f"kid_difference, {n}: peak traced memory (inputs {human_bytes(k['inputs_mib'] * MIB)} not counted)",
                      human_bytes(w["peak_traced_mib"] * MIB), "", "",
                      f"an n x n float64 matrix would be {k['n_by_n_matrix_gib']:.2f} GiB")]
        else:
            c, b = k["check"], k["one_block"]
            rows += [(f"kid_difference, {n} float64: time", f"one {k['block']}-row block {b['seconds']:.1f} s",
                      f"{human_seconds(k['projected_seconds'])} (rank 0 only)", "—",
                      f"5 kernels x n/{k['block']} blocks; at n={c['n']:,} projected {c['projected_seconds']:.1f} s, "
                      f"measured {c['seconds']:.1f} s"),
                     (f"kid_difference, {n}: peak traced memory of a block (inputs {human_bytes(k['inputs_mib'] * MIB)} "
                      "not counted)", human_bytes(b["peak_traced_mib"] * MIB), "", "",
                      f"whole run at n={c['n']:,}: {human_bytes(c['peak_traced_mib'] * MIB)}; an n x n float64 matrix "
                      f"would be {k['n_by_n_matrix_gib']:.1f} GiB")]
        rows += [(f"kid_difference, {n}: process peak RSS", f"{k['peak_rss_mib'] / 1024:.2f} GiB", "", "", "measured")]
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
    return lines


def report(results: dict) -> str:
    c = results["counts"]
    given = results["args"].get("sketchy_root")
    release = f"The release at {given}" if given else "Synthetic Sketchy release (256 px)"
    head = (f"{release} at scale {results['scale']:.3f} ({c['categories']} categories, {c['photos']:,} "
            f"photos, {c['sketches']:,} sketches); figures that grow with the data projected x "
            f"{results['projection_factor']:.3f} to Sketchy's 75,471 sketches. Latent stores: the tiny SD's VAE (4 latent "
            f"channels, factor 8: SD's latent layout, so bytes per image match SD's VAE at the same resolution). CPU, "
            f"{os.cpu_count()} cores (shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"total wall time {human_seconds(results['wall_seconds'])}.")
    return "\n".join([head, "", *table(results)]) + "\n"


# ----------------------------------------------------------------------------- main


def latent_projection(latents: list[dict], factor: float) -> list[dict]:
    """Store bytes at 512/1024 px with SD's VAE (factor 8) from the measured bytes per latent number, and the old cache."""
    out = []
    for entry in latents:
        if entry["resolution"] != min(e["resolution"] for e in latents):
            continue
        r = entry["result"]
        per_number = r["bytes_on_disk"] / (r["stored_images"] * r["numbers_per_image"])
        for res in (512, 1024):
            numbers = 2 * 4 * (res // 8) ** 2
            n_full, stored_full = r["images"] * factor, r["stored_images"] * factor
            out.append({"set": entry["set"], "resolution": res, "images": n_full, "stored_images": stored_full,
                        "bytes_per_number": per_number, "store_bytes": stored_full * numbers * per_number,
                        "old_bytes_per_rank": n_full * numbers * 4})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="", help="where full_scale.md/.json go (default: a new temp folder)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of Sketchy's 125 categories to make")
    parser.add_argument("--sketchy_root", default="", help="use this release instead of making a synthetic one")
    parser.add_argument("--resolution", type=int, nargs="+", default=[64], help="latent store resolution(s), px")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    parser.add_argument("--num_workers", type=int, default=1, help="decoding workers of the latent store build")
    parser.add_argument("--kid_n", type=int, default=0, help="features per set of the KID step (default: 75,471 x scale)")
    parser.add_argument("--kid_dims", type=int, default=2048)
    parser.add_argument("--kid_full_max", type=int, default=10_000, help="above this n, time one block and project")
    parser.add_argument("--kid_check_n", type=int, default=4_000, help="n of the whole run that checks the projection")
    parser.add_argument("--keep_data", action="store_true", help="keep OUTPUT_DIR/work (release, shards, stores)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_kwargs", help=argparse.SUPPRESS)
    parser.add_argument("--child_result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](**json.loads(args.child_kwargs))
        Path(args.child_result).write_text(json.dumps(result, indent=1))
        return
    if not 0 < args.scale <= 1:
        raise SystemExit("--scale must be in (0, 1]")

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores ran the tiny VAE 15x slower
    from sketch2real.sketchy import CATEGORIES
    from sketch2real.testing.tiny import build_all

    started = time.perf_counter()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="s2r-full-scale-"))
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    categories = list(CATEGORIES[: max(1, round(SKETCHY["categories"] * args.scale))])
    results: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("child")}}
    root = Path(args.sketchy_root) if args.sketchy_root else work / "sketchy"
    if not args.sketchy_root and "release" not in args.skip:
        shutil.rmtree(root, ignore_errors=True)
        print(f"release: {len(categories)} categories ...", flush=True)
        results["release"] = make_release(root, categories, out / "logs" / "release.log")
    results["counts"] = release_counts(root)
    results["scale"] = results["counts"]["categories"] / SKETCHY["categories"]
    results["projection_factor"] = SKETCHY["sketches"] / results["counts"]["sketches"]
    if "data_prep" not in args.skip:
        print("data_prep ...", flush=True)
        results["data_prep"] = data_prep(root, work)
    models = build_all(work / "tiny") if {"latents", "eval"} - set(args.skip) else None
    if "latents" not in args.skip:
        results["latents"] = []
        for resolution in args.resolution:
            # a DreamBooth style over every category reads its sketches through the same store as TI
            for name, field in (("ControlNet (a photo per pair)", "photo"),
                                ("TI and a DreamBooth style over every category (sketches)", "sketch")):
                print(f"latents: {name} at {resolution} px ...", flush=True)
                result, _, rss = run_child("latents", {"shards": str(work / "shards"), "vae_dir": str(models.sd / "vae"),
                                                       "store_root": str(work / "latent_cache"), "resolution": resolution,
                                                       "field": field, "num_workers": args.num_workers}, work)
                result["process_tree_peak_rss_mib"] = rss / MIB
                results["latents"].append({"set": name, "resolution": resolution, "result": result})
                shutil.rmtree(work / "latent_cache", ignore_errors=True)
        results["latent_projection"] = latent_projection(results["latents"], results["projection_factor"])
    if "eval" not in args.skip:
        print("eval: one category, then the whole test split ...", flush=True)
        small = evaluation(root, work, models, results["counts"]["category_names"][:1])
        results["eval"] = {**evaluation(root, work, models), "one_category": small}
        results["eval"]["projected_seconds"] = eval_projection(small, results["eval"], results["projection_factor"])
    if "kid" not in args.skip:
        n = args.kid_n or round(SKETCHY["sketches"] * args.scale)
        print(f"kid_difference: n={n:,} ...", flush=True)
        results["kid"], _, _ = run_child("kid", {"n": n, "dims": args.kid_dims, "full_max": args.kid_full_max,
                                                 "check_n": args.kid_check_n, "seed": 0}, work)
    results["wall_seconds"] = time.perf_counter() - started
    text = report(results)
    (out / "full_scale.md").write_text(text)
    (out / "full_scale.json").write_text(json.dumps(results, indent=1))
    if not args.keep_data:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    print(f"written: {out / 'full_scale.md'}, {out / 'full_scale.json'}")


if __name__ == "__main__":
    main()
