"""Every README promise about bad data and bad luck, tried: a corpus of bad shards through every job, planted
pickles and truncated files in checkpoints, another run's checkpoints, a full disk, hostile keys, the umask,
and signals during the long phases before training."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import REPO, launch, relative_difference, run_script, weights

CATEGORY = "cat"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A PNG of a few bytes that declares 20,000 x 20,000 pixels (400M, over the limit): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _transparent_sketch() -> bytes:
    """Black strokes on a fully transparent background (what many drawing tools export)."""
    array = np.zeros((64, 64, 4), dtype=np.uint8)
    array[20:44, 30:34, 3] = 255  # an opaque black bar; everything else RGBA (0, 0, 0, 0)
    return _png(Image.fromarray(array, mode="RGBA"))


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (200, 0, 0, 0)).save(buffer, format="JPEG")  # cyan
    return buffer.getvalue()


def _sixteen_bit() -> bytes:
    array = np.full((64, 64), 32768, dtype=np.uint16)  # mid grey in 16 bits
    return _png(Image.fromarray(array))


def test_sixteen_bit_images_scale_by_their_depth_however_dark():
    """A 16-bit image whose values all lie below 256 (a near-black scan) was taken for 8-bit values: mid-grey."""
    from sketch2real.shards import decode_image

    for value, expected in ((32768, 128), (100, 0), (65535, 255)):
        image = decode_image(_png(Image.fromarray(np.full((8, 8), value, dtype=np.uint16))), None, False, "16-bit")
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (expected,) * 3, (value, image.getpixel((0, 0)))


def _phone_jpeg() -> bytes:
    """A phone's photo: an upright 48 x 32 image (red top-left quarter) stored sideways with EXIF orientation 6."""
    upright = Image.new("RGB", (48, 32), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _rewrite(shard: Path, replace: dict[str, bytes]) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = replace.get(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="session")
def bad_shards(shard_dir, tmp_path_factory) -> tuple[Path, set[str], dict[str, str]]:
    """(shards with bad cat samples in train, the `shard:key` set a cat trainer must report, readable oddities).

    Corrupt bytes, a zero-byte image and a bomb in one shard; the cat sample at the end of another shard cut off
    by truncating the tar; plus a transparent sketch, a CMYK photo and a 16-bit sketch, which are not corrupt.
    """
    from sketch2real.shards import load_index

    root = tmp_path_factory.mktemp("bad") / "shards"
    shutil.copytree(shard_dir, root)
    entries = [e for e in load_index(root, "train")["shards"] if CATEGORY in e["categories"]]
    cat_keys = [(e["name"], k) for e in entries for k, c in zip(e["keys"], e["categories"]) if c == CATEGORY]
    assert len(cat_keys) >= 8 and len(entries) >= 2, "the synthetic release changed: adapt the corpus"
    (_, garbage), (_, empty), (_, bomb), (_, transparent), (_, cmyk), (_, deep) = cat_keys[:6]
    first = {n for n, _ in cat_keys[:6]}
    for name in first:
        replace = {}
        for shard, key in cat_keys[:6]:
            if shard != name:
                continue
            replace.update({
                garbage: {f"{key}.sketch.png": b"\x89PNG not really" * 7},
                empty: {f"{key}.sketch.png": b""},
                bomb: {f"{key}.sketch.png": _bomb()},
                transparent: {f"{key}.sketch.png": _transparent_sketch()},
                cmyk: {f"{key}.photo.jpg": _cmyk_jpeg()},
                deep: {f"{key}.sketch.png": _sixteen_bit()},
            }[key])
        _rewrite(root / name, replace)
    expected = {f"{shard}:{key}" for shard, key in cat_keys[:3]}
    # Truncate the last shard holding cats in the middle of its last cat sample's photo.
    last_shard, last_key = cat_keys[-1]
    assert last_shard not in first
    with tarfile.open(root / last_shard) as tar:
        infos = tar.getmembers()
    cut = next(i for i in infos if i.name == f"{last_key}.photo.jpg").offset_data + 10
    lost = {i.name.split(".")[0] for i in infos if i.offset_data + i.size > cut}
    data = (root / last_shard).read_bytes()
    (root / last_shard).write_bytes(data[:cut])
    expected |= {f"{last_shard}:{k}" for s, k in cat_keys if s == last_shard and k in lost}
    return root, expected, {"transparent": transparent, "cmyk": cmyk, "deep": deep}


def test_the_one_decoder(bad_shards):
    """Transparency on white, CMYK and 16 bits decoded right; bad bytes, empty files and bombs are `CorruptSample`s
    naming where they are; a truncated shard's lost members are corrupt, the rest readable."""
    from sketch2real.shards import CorruptSample, ShardSamples, decode_image

    transparent = np.asarray(decode_image(_transparent_sketch(), None, False))
    assert transparent[0, 0].tolist() == [255, 255, 255] and transparent[30, 31].tolist() == [0, 0, 0]
    assert np.asarray(decode_image(_sixteen_bit(), None, False))[0, 0].tolist() == [128, 128, 128]
    cyan = np.asarray(decode_image(_cmyk_jpeg(), None, False))[0, 0]
    assert cyan[0] < 100 < cyan[1] and cyan[2] > 100
    phone = decode_image(_phone_jpeg(), None, False)  # upright, as diffusers' load_image reads it (it trained sideways)
    assert phone.size == (48, 32) and np.asarray(phone)[2, 2, 0] > 200 and np.asarray(phone)[29, 45, 2] > 200
    phone_48_megapixels = decode_image(_png(Image.new("1", (8_000, 6_000), 1)), 64, False)  # refused as corrupt before
    assert phone_48_megapixels.size == (64, 64) and np.asarray(phone_48_megapixels).min() == 255
    for data, reason in [(b"", "UnidentifiedImageError"), (b"\x89PNG junk", "UnidentifiedImageError"), (_bomb(), "over the limit")]:
        with pytest.raises(CorruptSample, match=reason) as error:
            decode_image(data, 64, True, "shard-0.tar:cat/x")
        assert error.value.where == "shard-0.tar:cat/x" and "\n" not in str(error.value)
    root, expected, _ = bad_shards
    samples = ShardSamples(root, "train", categories=[CATEGORY], resolution=16)
    bad = set()
    for i in range(len(samples)):
        try:
            samples.read(i)
        except CorruptSample as err:
            bad.add(err.where)
    assert bad == expected


def test_an_instance_folder_leaves_out_hidden_and_unreadable_files_and_shard_photos_count_once(shard_dir, tmp_path):
    """A folder copied through a Mac has `._*` twins; a download cut short leaves a broken file. Each was "replaced
    by the next readable sample": a neighbour weighted twice, and `--num_instance_images 3` of `._a`, `._b`, `._c`
    stopped the run ("every one is corrupt") beside good images. Photos of pair shards were taken once per sketch."""
    from sketch2real.shards import corrupt_samples
    from sketch2real.training.data import load_folder_images, load_shard_images

    folder = tmp_path / "instances"
    folder.mkdir()
    colours = {"a.png": (255, 0, 0), "c.png": (0, 255, 0), "d.png": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 40), colour).save(folder / name)
        (folder / f"._{name}").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / "b.png").write_bytes(b"")
    (folder / "e.jpg").write_bytes(_phone_jpeg()[:200])  # cut short
    images = load_folder_images(str(folder), 8).pixels
    means = [tuple(round(float(v), 2) for v in image.mean((1, 2))) for image in images]
    assert means == [(1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0)]  # a, c, d: each once
    assert {str(folder / "b.png"), str(folder / "e.jpg")} <= set(corrupt_samples.summary()["keys"])
    assert len(load_folder_images(str(folder), 8, num_images=2).pixels) == 2
    photos, metas = load_shard_images(str(shard_dir), "train", "cat", "photo", 16)
    sketches, _ = load_shard_images(str(shard_dir), "train", "cat", "sketch", 16)
    distinct = {m["key"].rsplit("-", 1)[0] for m in metas}
    assert len(photos) == len(distinct) < len(sketches)

def test_image_folders_leave_out_hidden_files_and_folders_in_captioning_eval_and_training(tmp_path):
    """Captioning's --image_dir captioned a Mac's `._*` twins (each a corrupt image) and .ipynb_checkpoints/ copies;
    eval's folder sets and the trainers' instance folders left them out: one listing serves all three now."""
    from sketch2real.cli import UserError
    from sketch2real.metrics import folder_set
    from sketch2real.training.data import load_folder_images

    from .helpers import import_script

    for where in ("cat/a.png", "cat/._a.png", ".ipynb_checkpoints/b.png", "dog/.hidden/c.png", "dog/d.png"):
        (tmp_path / "set" / where).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "set" / where, format="PNG")
    # a category linked in from elsewhere (left out without a word), a GIF (its first frame), a link back up (once)
    (tmp_path / "elsewhere" / "cow").mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "elsewhere" / "cow" / "e.gif", format="GIF")
    (tmp_path / "set" / "cow").symlink_to(tmp_path / "elsewhere" / "cow", target_is_directory=True)
    (tmp_path / "elsewhere" / "cow" / "up").symlink_to(tmp_path / "set", target_is_directory=True)
    listed = ["cat/a.png", "cow/e.gif", "dog/d.png"]
    captioned = import_script("infer/caption.py")._folder_items(str(tmp_path / "set"), 0, 1, [])
    assert sorted(Path(it["path"]).relative_to(tmp_path / "set").as_posix() for it in captioned) == listed
    assert folder_set(str(tmp_path / "set")).ids == listed
    (tmp_path / "set" / "cow").unlink()
    assert len(load_folder_images(str(tmp_path / "set" / "cat"), 8).pixels) == 1
    (tmp_path / "set" / "cat" / "a.png").unlink()  # the twin alone
    for read in (lambda f: load_folder_images(str(f), 8), lambda f: folder_set(str(f))):
        with pytest.raises(UserError, match="no images in"):
            read(tmp_path / "set" / "cat")


def test_trainers_skip_and_count_corrupt_samples_and_resume_exactly(bad_shards, tiny_models, tmp_path):
    """DreamBooth on the bad corpus: runs, reports exactly the corrupt keys, and the substitution is a function of
    the step: a resume across it is bit-identical, and 2 DDP processes agree with 1."""
    root, expected, _ = bad_shards
    args = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", root, "--instance_category", CATEGORY,
            "--instance_prompt", "a sks sketch of a cat", "--resolution", "32", "--learning_rate", "1e-3",
            "--validation_steps", "0", "--report_to", "none", "--max_train_steps", "4", "--num_heldout_samples", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_script("train/dreambooth.py", *args, "--output_dir", straight, "--checkpointing_steps", "2",
                      "--train_batch_size", "2")
    metrics = json.loads((straight / "metrics.json").read_text())
    assert set(metrics["corrupt_samples"]["keys"]) == expected and metrics["corrupt_samples"]["count"] == len(expected)
    assert "Traceback" not in proc.stderr
    assert all(f"corrupt sample {where} (" in proc.stderr for where in expected)  # one line each, shard and key
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--checkpointing_steps", "2", "--train_batch_size", "2",
               "--resume_from_checkpoint", "latest")
    a, b = weights(straight / "unet"), weights(resumed / "unet")
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    two = tmp_path / "two"
    launch("train/dreambooth.py", *args, "--output_dir", two, "--train_batch_size", "1")
    assert set(json.loads((two / "metrics.json").read_text())["corrupt_samples"]["keys"]) == expected
    assert relative_difference(a, weights(two / "unet"), weights(tiny_models.sd / "unet")) < 1e-2


def test_controlnet_pairs_with_a_corrupt_half_are_replaced_whole_in_workers(bad_shards, tiny_models, tmp_path):
    """ControlNet reads sketch and photo through DataLoader workers: the corrupt pairs met in the workers reach
    metrics.json, and the run is the same with 0 and 2 workers."""
    root, expected, _ = bad_shards
    args = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", root, "--categories", CATEGORY,
            "--resolution", "32", "--learning_rate", "1e-3", "--validation_steps", "0", "--checkpointing_steps", "0",
            "--report_to", "none", "--max_train_steps", "6", "--train_batch_size", "4", "--num_heldout_samples", "0",
            "--cache_latents", "false"]
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        run_script("train/controlnet.py", *args, "--output_dir", out, "--dataloader_num_workers", workers)
        runs[workers] = weights(out)
        assert set(json.loads((out / "metrics.json").read_text())["corrupt_samples"]["keys"]) == expected
    assert all(torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])


def test_textual_inversion_counts_the_corrupt_samples_it_met(bad_shards, tiny_models, tmp_path):
    root, expected, _ = bad_shards
    out = tmp_path / "ti"
    run_script("train/textual_inversion.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", root,
               "--categories", CATEGORY, "--resolution", "32", "--learning_rate", "5e-2", "--validation_steps", "0",
               "--checkpointing_steps", "0", "--report_to", "none", "--max_train_steps", "2", "--num_heldout_samples", "0",
               "--output_dir", out)
    assert set(json.loads((out / "metrics.json").read_text())["corrupt_samples"]["keys"]) == expected
    assert (out / "learned_embeds.safetensors").is_file()


def test_eval_generate_and_caption_finish_and_count(bad_shards, tiny_models, tmp_path):
    """Eval scores around unreadable references (pairing included) and writes metrics.json; generation's mosaics
    leave a corrupt sketch's cell empty and exit 0; captioning a truncated shard says how many it skipped."""
    root, expected, _ = bad_shards
    gen = tmp_path / "gen"
    run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", root, "--split", "train",
               "--categories", CATEGORY, "--height", "32", "--width", "32", "--num_inference_steps", "2",
               "--prompt_template", "a photo of a {category}", "--output_dir", gen, "--batch_size", "8")
    generated = json.loads((gen / "metrics.json").read_text())
    assert (gen / "mosaics" / "overview.png").is_file()
    assert set(generated["corrupt_samples"]["keys"]) <= expected and generated["corrupt_samples"]["count"] >= 1
    run_script("eval/fid.py", "--generated", f"gen={gen}", "--reference_shards", root, "--reference_split", "train",
               "--reference_field", "sketch", "--categories", CATEGORY, "--dims", "64", "--cache_dir", tmp_path / "cache",
               "--batch_size", "4", "--output_dir", tmp_path / "fid")
    report = json.loads((tmp_path / "fid" / "metrics.json").read_text())
    # the reference's features, read around unreadable images, are not cached: a repaired copy of the shards (same
    # index, same cache key) was scored with the damaged read's features
    assert not list((tmp_path / "cache").glob("*.npz")) and not report["reference"]["cache_hit"]
    reference_name = report["reference"]["name"]
    assert {k.split(":", 1)[1] for k in report["corrupt_samples"]["keys"]} == {w.split(":", 1)[1] for w in expected}
    assert all(k.startswith(f"{reference_name}:") for k in report["corrupt_samples"]["keys"])
    corrupt_keys = {w.split(":", 1)[1] for w in expected}
    rows = [json.loads(line) for line in (gen / "index.jsonl").read_text().splitlines()]
    assert report["sets"]["gen"]["pairing"]["pairs"] == sum(r["sample_key"] not in corrupt_keys for r in rows)
    proc = run_script("infer/caption.py", "--model_name_or_path", tiny_models.blip2, "--shard_dir", root, "--split", "train",
                      "--categories", CATEGORY, "--max_new_tokens", "4", "--batch_size", "4", "--num_workers", "0",
                      "--prompts", "1", "--output_dir", tmp_path / "cap")
    captioned = {json.loads(line)["key"] for line in (tmp_path / "cap" / "captions.jsonl").read_text().splitlines()}
    counted = json.loads((tmp_path / "cap" / "metrics.json").read_text())["corrupt_samples"]
    assert set(counted["keys"]) == expected and f"{len(expected)} corrupt images skipped" in proc.stdout
    assert not captioned & {w.split(":", 1)[1] for w in expected}


def test_colliding_keys_in_a_release_are_one_line(tmp_path):
    from sketch2real.synthetic import make_synthetic_sketchy

    root = tmp_path / "sketchy"
    make_synthetic_sketchy(root, photos_per_category=2, sketches_per_photo=1, size=32, seed=0)
    photos = sorted((root / "256x256/photo/tx_000000000000/cat").glob("*.jpg"))
    sketch_dir = root / "256x256/sketch/tx_000000000000/cat"
    stem = photos[0].stem
    assert "_" in stem, stem
    dotted = stem.replace("_", ".", 1)  # `a.b` and `a_b` become one key
    shutil.copy(photos[0], photos[0].with_name(f"{dotted}.jpg"))
    shutil.copy(next(sketch_dir.glob(f"{stem}-*.png")), sketch_dir / f"{dotted}-1.png")
    proc = run_script("data_prep/build_splits.py", "--sketchy_root", root, "--output_dir", tmp_path / "splits", check=False)
    assert proc.returncode == 2 and "give the same sample key" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpointed(tiny_models, shard_dir, tmp_path_factory) -> tuple[list, Path]:
    """A 6-step LoRA DreamBooth run with checkpoints at 2, 4 and 6 (its args, its folder)."""
    args = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--instance_category", CATEGORY,
            "--instance_prompt", "a sks sketch of a cat", "--resolution", "32", "--learning_rate", "1e-3", "--lora_rank", "4",
            "--validation_steps", "0", "--report_to", "none", "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--num_heldout_samples", "0", "--lr_scheduler", "cosine"]
    out = tmp_path_factory.mktemp("ckpt") / "straight"
    previous = os.umask(0o022)  # a group-shared project's umask: the trained files' modes are checked against it
    try:
        run_script("train/dreambooth.py", *args, "--output_dir", out)
    finally:
        os.umask(previous)
    return args, out


def _resume_with(args, straight: Path, tmp_path: Path, damage) -> subprocess.CompletedProcess:
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(straight / name, out / name)
    damage(out / "checkpoint-4")
    proc = run_script("train/dreambooth.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr and "checkpoint-2" in proc.stderr.split("resumed from")[1].splitlines()[0]
    a, b = weights(straight), weights(out)
    assert a and all(torch.equal(a[k], b[k]) for k in a)  # fell back, and ended bit-identical to the straight run
    name = "pytorch_lora_weights.safetensors"  # the file too, byte for byte (its header's metadata in one order)
    assert (straight / name).read_bytes() == (out / name).read_bytes()
    return proc


def test_a_planted_pickle_never_runs(checkpointed, tmp_path):
    args, straight = checkpointed
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def plant(folder: Path) -> None:
        torch.save({"step": Payload()}, folder / "custom_checkpoint_0.pkl")
        rng = next(folder.glob("random_states_*.pkl"))
        size = rng.stat().st_size
        torch.save({"state": Payload()}, rng)  # a listed file replaced: unsafe globals inside
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][rng.name] = rng.stat().st_size  # even with a forged manifest
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert size

    proc = _resume_with(args, straight, tmp_path, plant)
    assert not marker.exists()
    assert "refused" in proc.stderr


def test_deepspeed_s_own_checkpoint_classes_pass_the_verifier_and_code_beside_them_does_not(tmp_path):
    """DeepSpeed pickles its loss scaler (fp16's dynamic one too, with a dtype), ZeRO stage and slice map into every
    optimizer file: admitted (else every DeepSpeed resume starts over); a callable beside them is still refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from sketch2real.training.checkpoints import unsafe_globals

    state = {"loss_scaler": LossScaler(1), "dynamic": DynamicLossScaler(2 ** 16, 1000, 1, 2, False),
             "zero_stage": ZeroStageEnum(2), "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
             "exp_avg": torch.zeros(4)}
    torch.save(state, tmp_path / "optim_states.pt")
    assert unsafe_globals(tmp_path / "optim_states.pt") == []
    torch.save({**state, "hook": os.system}, tmp_path / "planted.pt")
    assert unsafe_globals(tmp_path / "planted.pt") == ["posix.system"]


def test_a_truncated_newest_checkpoint_falls_back(checkpointed, tmp_path):
    args, straight = checkpointed

    def truncate(folder: Path) -> None:
        victim = max((p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    proc = _resume_with(args, straight, tmp_path, truncate)
    assert proc.stderr.count("is not intact") == 1  # once (the look before the model loads says nothing of it)


def test_a_checkpoint_of_renamed_weights_is_refused_not_resumed_from_fresh_adapters(checkpointed, tmp_path):
    """A version that renamed a module (`DreamBoothModel.unet` to `.denoiser`) resumed an older checkpoint "from step 2"
    with its LoRA dropped (loading is not strict: fresh adapters, the old optimizer state): one line now, by the names
    in its model file (a checkpoint from before train_state.json's digest) or by that digest."""
    from safetensors.torch import load_file, save_file

    args, straight = checkpointed
    for case in ("older", "digest"):
        folder = tmp_path / case / "checkpoint-2"
        shutil.copytree(straight / "checkpoint-2", folder)
        state = json.loads((folder / "train_state.json").read_text())
        if case == "older":  # as the version before the rename saved it: no digest, the module's old name
            del state["trained_weights"]
            tensors = load_file(folder / "model.safetensors")
            save_file({k.replace("denoiser.", "unet.", 1): v for k, v in tensors.items()}, folder / "model.safetensors")
        else:
            state["trained_weights"] = "0" * 16
        (folder / "train_state.json").write_text(json.dumps(state))
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": {
            name: (folder / name).stat().st_size for name in manifest["files"]}}))
        proc = run_script("train/dreambooth.py", *args, "--output_dir", folder.parent, "--resume_from_checkpoint",
                          "latest", check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "holds trained weights named otherwise" in last, proc.stderr[-2000:]
        assert ("e.g. 'denoiser." in last) == (case == "older") and not (folder.parent / "checkpoint-4").exists()


def test_a_folder_of_the_user_s_images_is_part_of_the_run_by_what_it_holds(tiny_models, tmp_path):
    """A checkpoint of a run on --instance_data_dir resumed after the folder's images were edited (known by its path
    alone), as if the same run; a copy of the folder elsewhere is the same run."""
    from sketch2real.cli import parse_options
    from sketch2real.training.checkpoints import run_fingerprint
    from sketch2real.training.dreambooth import DreamBoothOptions

    def fingerprint(folder: Path):
        return run_fingerprint(parse_options(DreamBoothOptions, [
            "--pretrained_model_name_or_path", str(tiny_models.sd), "--instance_data_dir", str(folder),
            "--instance_prompt", "a sks cat", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "4"]), 1)

    folder = tmp_path / "mine"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(folder / name)
    saved = json.loads(json.dumps(fingerprint(folder)))  # as train_state.json holds it
    assert fingerprint(shutil.copytree(folder, tmp_path / "copied")).matches(saved)
    Image.new("RGB", (16, 16), "green").save(folder / "b.png")  # edited in place: the same name and size
    assert not fingerprint(folder).matches(saved) and "instance_data_dir_data" in fingerprint(folder).differences(saved)



def test_a_change_of_how_prompts_become_conditioning_is_another_run_and_another_text_store(tiny_models, monkeypatch,
                                                                                           tmp_path):
    """A version that changed what a prompt encodes to (SD3's --max_sequence_length cut CLIP too, then T5 only)
    resumed the older version's checkpoints and served its text store: both hold `CONDITIONING_VERSION` now; a
    checkpoint from before it was recorded resumes."""
    import torch

    from sketch2real.cli import parse_options
    from sketch2real.family import family_of
    from sketch2real.training import checkpoints, dreambooth

    opts = parse_options(dreambooth.DreamBoothOptions, [
        "--pretrained_model_name_or_path", str(tiny_models.sd), "--shard_dir", "s", "--instance_category", "cat",
        "--output_dir", "out"])
    saved = json.loads(json.dumps(checkpoints.run_fingerprint(opts, 1)))
    store = dreambooth.text_store_identity(opts, family_of(str(tiny_models.sd)), torch.float32)
    older = {k: v for k, v in saved.items() if k != "conditioning_version"}
    assert checkpoints.run_fingerprint(opts, 1).matches(older)
    for module in (checkpoints, dreambooth):
        monkeypatch.setattr(module, "CONDITIONING_VERSION", checkpoints.CONDITIONING_VERSION + 1)
    assert "conditioning_version" in checkpoints.run_fingerprint(opts, 1).differences(saved)
    assert dreambooth.text_store_identity(opts, family_of(str(tiny_models.sd)), torch.float32) != store
    # SDXL on a folder of photos, told 256 px of each before, each one's size now: its older checkpoints are another run
    Image.new("RGB", (48, 32), "red").save(tmp_path / "a.png")
    sdxl = parse_options(dreambooth.DreamBoothOptions, [
        "--pretrained_model_name_or_path", str(tiny_models.sdxl), "--instance_data_dir", str(tmp_path),
        "--instance_prompt", "a sks photo", "--output_dir", "out"])
    saved = json.loads(json.dumps(checkpoints.run_fingerprint(sdxl, 1)))
    assert checkpoints.run_fingerprint(sdxl, 1).matches(saved)
    older = {k: v for k, v in saved.items() if k not in ("time_ids", "conditioning_version")}
    assert "time_ids: (absent) there" in checkpoints.run_fingerprint(sdxl, 1).differences(older)


def test_a_lora_checkpoint_holds_the_step_s_adapters_as_diffusers_loads_them(checkpointed, tiny_models, tmp_path):
    """Each checkpoint of a LoRA run holds pytorch_lora_weights.safetensors, as diffusers' DreamBooth LoRA checkpoints
    do: the step's trained adapters (those its training state holds), loaded by plain diffusers and, with the run's
    base found through the run's folder, by generation; the checkpoint still resumes."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    from sketch2real.generation import base_of_lora_output
    from sketch2real.training.checkpoints import verify_checkpoint

    _, straight = checkpointed
    folder = straight / "checkpoint-4"
    saved = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in
                                             StableDiffusionPipeline.lora_state_dict(folder)[0].items()})
    trained = {k.removeprefix("model.safetensors:denoiser.").replace(".default", ""): v
               for k, v in weights(folder).items() if k.startswith("model.safetensors:denoiser.") and ".lora_" in k}
    assert saved and saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    final = StableDiffusionPipeline.lora_state_dict(straight)[0]
    assert any(not torch.equal(final[k], v) for k, v in StableDiffusionPipeline.lora_state_dict(folder)[0].items())
    assert base_of_lora_output(str(folder), "") == (str(tiny_models.sd), str(folder))
    assert verify_checkpoint(folder) == ""
    # written after the manifest, and not what a resume reads: a kill while writing it keeps the checkpoint
    torn = tmp_path / "checkpoint-4"
    shutil.copytree(folder, torn)
    copy = torn / "pytorch_lora_weights.safetensors"
    copy.write_bytes(copy.read_bytes()[:100])
    assert verify_checkpoint(torn) == ""


def test_no_resumable_checkpoint_stops_a_resume_in_one_line(checkpointed, tmp_path):
    """Every checkpoint damaged: the resume stops (exit 2) rather than train from step 0 beside them."""
    args, straight = checkpointed
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(straight / name, out / name)
        (out / name / "manifest.json").unlink()
    proc = run_script("train/dreambooth.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none of the 2 checkpoints" in proc.stderr.strip().splitlines()[-1] and not (out / "metrics.json").exists()
    assert "Loading weights" not in proc.stderr  # said before the model loads
    # 2 processes (rank 0 decides for all; a global batch of 2: another run's): said once per node, not once per rank
    # (8 lines on a node of 8 GPUs)
    proc = launch("train/dreambooth.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest", check=False)
    said = [line for line in proc.stderr.splitlines() if "dreambooth.py: error: " in line]
    assert proc.returncode != 0 and len(said) == 1 and "holds checkpoints of another run" in said[0], proc.stderr[-3000:]


def test_another_runs_checkpoints_stop_a_fresh_run_and_pruning_keeps_own(checkpointed, tmp_path):
    args, straight = checkpointed
    out = tmp_path / "shared"
    out.mkdir()
    shutil.copytree(straight / "checkpoint-4", out / "checkpoint-4")
    proc = run_script("train/dreambooth.py", *args, "--output_dir", out, "--seed", "7", check=False)
    assert proc.returncode == 2 and "holds checkpoints of another run" in proc.stderr and "seed: 0 there, 7 now" in proc.stderr
    assert "Traceback" not in proc.stderr
    # before the model loads (it came after loading and `prepare`: minutes for FLUX, on every requeue)
    assert "Loading pipeline components" not in proc.stderr and "Loading weights" not in proc.stderr
    # another folder's checkpoint named by its path: the same check (it went on to a size-mismatch traceback)
    proc = run_script("train/dreambooth.py", *args, "--output_dir", tmp_path / "elsewhere", "--seed", "7",
                      "--resume_from_checkpoint", straight / "checkpoint-4", check=False)
    assert proc.returncode == 2 and "is of another run (seed: 0 there, 7 now)" in proc.stderr.strip().splitlines()[-1]
    # The same run started afresh: its own older checkpoints are its own; pruning never removes the one just saved.
    run_script("train/dreambooth.py", *args, "--output_dir", out, "--checkpoints_total_limit", "1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # the last step's, as diffusers


def test_a_finished_constant_lr_run_given_more_steps_continues_from_its_last_step_as_one_longer_run(checkpointed,
                                                                                                      tmp_path):
    """The last step is checkpointed, as diffusers' scripts do: a finished run extended with more steps continues from
    its end (it went back to its last checkpoint before it) and equals one run of the longer length."""
    args = [*checkpointed[0], "--lr_scheduler", "constant", "--max_train_steps", "4"]  # the later flags win
    out, straight = tmp_path / "extended", tmp_path / "straight"
    run_script("train/dreambooth.py", *args, "--output_dir", out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    proc = run_script("train/dreambooth.py", *args, "--max_train_steps", "6", "--output_dir", out,
                      "--resume_from_checkpoint", "latest")
    assert "checkpoint-4" in proc.stderr.split("resumed from")[1].splitlines()[0]
    run_script("train/dreambooth.py", *args, "--max_train_steps", "6", "--output_dir", straight)
    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_an_older_version_without_a_new_option_resumes_where_it_is_at_its_default(checkpointed, tmp_path):
    """A job requeued onto an upgraded checkout: its checkpoint's fingerprint lacks the options added since. At their
    default they are the same run (it was refused as another run, with an empty explanation); given, they are not."""
    args, straight = checkpointed

    def older(name: str, dropped: str) -> Path:  # checkpoint-4 as a version without option `dropped` wrote it
        folder = tmp_path / name / "checkpoint-4"
        shutil.copytree(straight / "checkpoint-4", folder)
        state = json.loads((folder / "train_state.json").read_text())
        assert dropped in state["fingerprint"]
        del state["fingerprint"][dropped], state["schedule_steps"]  # its schedule: the step count
        (folder / "train_state.json").write_text(json.dumps(state))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["train_state.json"] = (folder / "train_state.json").stat().st_size
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder.parent

    out = older("upgraded", "text_encoder_lr")  # at its default (None) in this run
    proc = run_script("train/dreambooth.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr
    a, b = weights(straight), weights(out)  # the run never interrupted, bit for bit
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = older("given", "learning_rate")  # the run gives it (1e-3): the old run's value is unknown
    proc = run_script("train/dreambooth.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest", check=False)
    assert proc.returncode == 2 and "learning_rate: (absent) there, 0.001 now" in proc.stderr.strip().splitlines()[-1]


def test_the_schedule_resumes_at_the_steps_it_took_which_fp16_s_skipped_steps_did_not_move(checkpointed, tmp_path):
    """fp16's loss scaler skips steps with inf gradients, and the schedule with them: a resume fast-forwarded it by
    the step count, ahead of the run never interrupted. The checkpoint records the schedule's own steps (here one
    taken as skipped: another learning rate from there on); an older checkpoint without them, the step count (the
    test of an older version's checkpoint)."""
    args, straight = checkpointed
    folder = tmp_path / "skipped" / "checkpoint-4"
    shutil.copytree(straight / "checkpoint-4", folder)
    text = (folder / "train_state.json").read_text()
    assert json.loads(text)["schedule_steps"] == 4  # rewritten in as many bytes: the manifest holds their count
    (folder / "train_state.json").write_text(text.replace('"schedule_steps": 4', '"schedule_steps": 3'))
    run_script("train/dreambooth.py", *args, "--output_dir", folder.parent, "--resume_from_checkpoint", "latest")
    a, skipped = weights(straight), weights(folder.parent)
    assert not all(torch.equal(a[k], skipped[k]) for k in a)


def test_a_slower_rank_s_files_are_in_the_manifest_and_the_checkpoint_resumes(tiny_models, shard_dir, tmp_path,
                                                                             monkeypatch):
    """Rank 1 writes its random states only after rank 0's manifest appears (tests/probes/late_rank; a slow node on
    shared storage): the manifest still lists them, since rank 0 lists the folder after every rank's files are written,
    and a resume takes the checkpoint. (Without that collective: "random_states_1.pkl was not written by the run",
    and a requeued job restarted from step 0: CI, two nodes.)"""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO / "tests/probes/late_rank"),
                                                                 os.environ.get("PYTHONPATH", "")) if p))
    monkeypatch.setenv("S2R_PROBE_LATE_RANK", "1")
    out = tmp_path / "db"
    args = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--instance_category", "cat",
            "--resolution", "32", "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "0",
            "--num_heldout_samples", "0", "--report_to", "none", "--lora_rank", "4", "--output_dir", out]
    launch("train/dreambooth.py", *args)
    listed = json.loads((out / "checkpoint-2" / "manifest.json").read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(listed)
    monkeypatch.delenv("S2R_PROBE_LATE_RANK")
    (out / "pytorch_lora_weights.safetensors").unlink(missing_ok=True)
    proc = launch("train/dreambooth.py", *args, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr


def test_a_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    """save_state failing with ENOSPC: one line naming the folder and the space (in units that show it: 4 KiB, not
    "0.00 GiB"), `.partial` removed, older kept. The next save that succeeds removes what a kill mid-save left
    (`checkpoint-N.partial`, never resumable: gigabytes each for a full fine-tune)."""
    import errno

    from sketch2real.cli import UserError
    from sketch2real.training.checkpoints import RunFingerprint, save_checkpoint

    class FullDisk:
        is_main_process, num_processes, state = True, 1, type("S", (), {"deepspeed_plugin": None})()

        def wait_for_everyone(self):
            pass

        def save_state(self, folder, **kwargs):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"y" * 4096)
    with pytest.raises(UserError) as error:
        save_checkpoint(FullDisk(), tmp_path, 2, 3, RunFingerprint({}, {}))
    message = str(error.value)
    assert "no space left in" in message and str(tmp_path) in message and "\n" not in message
    assert re.search(r"about 4\.0 KiB needed, \d+\.\d+ [GMK]iB free", message), message
    assert not (tmp_path / "checkpoint-2.partial").exists() and (tmp_path / "checkpoint-1").is_dir()

    class TorchSaveFails(FullDisk):  # torch.save's C++ writer on a full disk
        def save_state(self, folder, **kwargs):
            Path(folder).mkdir(parents=True)
            raise RuntimeError("basic_ios::clear: iostream error")

    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as patched:  # less free than the last checkpoint takes: a full disk, whatever it said
        patched.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100))
        with pytest.raises(UserError, match=r"no space left in .*about 4\.0 KiB needed, 0\.1 KiB free"):
            save_checkpoint(TorchSaveFails(), tmp_path, 2, 3, RunFingerprint({}, {}))
    with pytest.raises(UserError, match=r"failed \(RuntimeError: basic_ios::clear: iostream error\)"):
        save_checkpoint(TorchSaveFails(), tmp_path, 2, 3, RunFingerprint({}, {}))  # room enough: the error itself

    class Saves(FullDisk):
        def save_state(self, folder, **kwargs):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"x" * 1000)

    (tmp_path / "checkpoint-7.partial").mkdir()  # a kill mid-save
    (tmp_path / "checkpoint-7.partial" / "model.safetensors").write_bytes(b"x" * 10)
    save_checkpoint(Saves(), tmp_path, 3, 3, RunFingerprint({}, {}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


# ------------------------------------------------------------------------------------------- keys, umask, signals


def test_keys_from_data_never_leave_their_folder(tiny_models, tmp_path):
    captions = tmp_path / "captions.jsonl"
    rows = [{"key": "cat/ok_1-1", "caption": "a cat", "category": "cat", "prompt_id": 1},
            {"key": "../../escaped", "caption": "a cat", "category": "cat", "prompt_id": 1}]
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "deep" / "gen"
    proc = run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd, "--captions", captions,
                      "--height", "32", "--width", "32", "--num_inference_steps", "1", "--output_dir", out, check=False)
    assert proc.returncode == 2 and "refusing key '../../escaped" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("escaped*")) and not (out / "images").exists()
    from sketch2real.cli import UserError
    from sketch2real.io import key_path

    for key in ["/etc/passwd", "a/../../b", "a\x00b", "", "a//b", "..", "a\\b"]:
        with pytest.raises(UserError):
            key_path(tmp_path, key, ".png")
    assert key_path(tmp_path, "cat/n1_2-3", ".png") == tmp_path / "cat" / "n1_2-3.png"


def test_a_full_disk_is_one_line_and_a_torn_row_is_cut_before_the_next(tiny_models, shard_dir, tmp_path):
    """A file-size limit stands in for a full disk or quota: generation stops with one line and exit 1 (it was a
    traceback). A row torn by such a stop (or a kill) was glued to the next append and both were lost on read."""
    from sketch2real.io import append_jsonl, read_jsonl

    command = [sys.executable, str(REPO / "infer/generate.py"), "--pretrained_model_name_or_path", str(tiny_models.sd),
               "--shard_dir", str(shard_dir), "--split", "test", "--prompt_template", "a {category}", "--height", "32",
               "--width", "32", "--num_inference_steps", "1", "--max_per_category", "1", "--output_dir", str(tmp_path / "gen")]
    proc = subprocess.run(["bash", "-c", 'ulimit -f 1 && exec "$@"', "limited", *command], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("error: File too large: free space (or raise the quota) and rerun")
    # the trainers' writers are not Python file objects: safetensors raises its own error ("os error 27"), the same line
    script = ("import torch; from safetensors.torch import save_file; from sketch2real.cli import run_main; "
              f"run_main(lambda: save_file({{'w': torch.zeros(4096)}}, {str(tmp_path / 'w.safetensors')!r}))")
    proc = subprocess.run(["bash", "-c", 'ulimit -f 1 && exec "$@"', "limited", sys.executable, "-c", script],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "(os error 27): free space (or raise the quota) and rerun" in proc.stderr.strip().splitlines()[-1]
    part = tmp_path / "index.rank000.jsonl"
    part.write_text('{"key": "a"}\n{"key": "b", "ima')
    append_jsonl(part, [{"key": "c"}])
    assert read_jsonl(part) == [{"key": "a"}, {"key": "c"}]
    # a hand-edited file: a last line that ends in its newline was written whole, not torn: said, not dropped; a BOM
    # is not part of the first row; a caption that is not text is one line (it was an AttributeError)
    from sketch2real.cli import UserError

    edited = tmp_path / "captions.jsonl"
    edited.write_bytes('{"key": "a", "prompt_id": 0, "caption": "a cat"}\n{"key": "b", "prompt_id": 0, "caption": "x",}\n'
                       .encode("utf-8-sig"))
    with pytest.raises(UserError, match=r"captions.jsonl, line 2: not a JSON row"):
        read_jsonl(edited)
    edited.write_bytes('{"key": "a", "prompt_id": 0, "caption": null}\n'.encode("utf-8-sig"))
    with pytest.raises(UserError, match=r"captions.jsonl, line 1: caption is null, not a string"):
        read_jsonl(edited, required=("key", "prompt_id", "caption"), text=("key", "caption"))
    edited.write_bytes('{"key": "a", "prompt_id": 0, "caption": "a cat\u2028\u0085"}\n'.encode("utf-8-sig"))
    assert read_jsonl(edited) == [{"key": "a", "prompt_id": 0, "caption": "a cat\u2028\u0085"}]  # JSON's, not lines


def test_a_safetensors_file_s_bytes_do_not_depend_on_the_process_that_wrote_it(tmp_path):
    """safetensors orders a header's metadata by a hash seeded per process: the LoRA of a run and of its rerun held the
    same tensors and metadata in other bytes (a sha256sum check of "bit-identical" failed). Sorted after writing."""
    import hashlib

    code = ("import sys, numpy; from safetensors.numpy import save_file; from sketch2real.io import "
            "sort_safetensors_metadata; save_file({'w': numpy.zeros(4, dtype=numpy.float32)}, sys.argv[1], metadata="
            "{'format': 'pt', 'lora_adapter_metadata': '{\"r\": 4}', 'ss_network_dim': '4', 'ss_network_alpha': '8'}); "
            "sort_safetensors_metadata(sys.argv[1])")
    digests = set()
    for run in range(5):
        path = tmp_path / f"run{run}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["ss_network_alpha"] == "8" and f.get_tensor("w").tolist() == [0.0] * 4
    assert len(digests) == 1


def test_outputs_respect_the_umask(checkpointed, tmp_path):
    """Under umask 022 the atomic writer, saved pipelines and trained safetensors are 0644 (folders 0755); so is
    what safetensors' own writer puts at the atomic path (Textual Inversion's embeddings, the ComfyUI LoRA: 0600), and
    every file of a checkpoint (accelerate's weights through safetensors: 0600)."""
    from safetensors.torch import save_file

    from sketch2real.io import atomic_path, write_json
    from sketch2real.models import save_pretrained_atomic

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_path(tmp_path / "embeds.safetensors") as tmp:
            save_file({"x": torch.zeros(1)}, tmp)
        from diffusers import UNet2DModel

        save_pretrained_atomic(UNet2DModel(sample_size=8, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                           up_block_types=("UpBlock2D",), norm_num_groups=4, layers_per_block=1), tmp_path / "model")
    finally:
        os.umask(previous)
    _, straight = checkpointed  # trained under umask 022
    files = [tmp_path / "m.json", tmp_path / "embeds.safetensors", *(tmp_path / "model").rglob("*.safetensors"),
             straight / "pytorch_lora_weights.safetensors",
             straight / "metrics.json", straight / "run_config.json",
             *(p for p in (straight / "checkpoint-4").rglob("*") if p.is_file())]  # a colleague resumes or loads them
    assert len(files) >= 10
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, {p.name: oct(p.stat().st_mode & 0o777) for p in files}


def _signal_when(cmd: list[str], ready, sig: int, timeout: float = 180) -> tuple[subprocess.Popen, float, str]:
    """Start `cmd`, send `sig` once `ready()` holds; (process, seconds from signal to exit, stderr)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    sent = time.time()
    _, stderr = proc.communicate(timeout=120)
    return proc, time.time() - sent, stderr


def test_signal_during_class_image_generation_requeues_and_keeps_images(tiny_models, shard_dir, tmp_path):
    out, classes = tmp_path / "db", tmp_path / "classes"
    cmd = [sys.executable, str(REPO / "train/dreambooth.py"), "--pretrained_model_name_or_path", str(tiny_models.sd),
           "--shard_dir", str(shard_dir), "--instance_category", CATEGORY, "--resolution", "32", "--report_to", "none",
           "--max_train_steps", "2", "--with_prior_preservation", "--class_prompt", "a sketch of a cat",
           "--class_data_dir", str(classes), "--num_class_images", "60", "--sample_batch_size", "1",
           "--class_inference_steps", "10", "--output_dir", str(out)]
    proc, seconds, stderr = _signal_when(cmd, lambda: len(list(classes.glob("class-*.png"))) >= 2, signal.SIGUSR1)
    assert proc.returncode == 75, stderr[-3000:]
    assert (out / "PREEMPTED").is_file() and "preempted" in stderr and seconds < 30
    kept = len(list(classes.glob("class-*.png")))
    assert 2 <= kept < 60 and not list(out.glob("checkpoint-*"))


def test_signal_during_latent_caching_requeues_before_training(tiny_models, shard_dir, tmp_path):
    out = tmp_path / "cn"
    cmd = [sys.executable, str(REPO / "train/controlnet.py"), "--pretrained_model_name_or_path", str(tiny_models.sd),
           "--shard_dir", str(shard_dir), "--resolution", "64", "--report_to", "none", "--validation_steps", "0",
           "--max_train_steps", "400", "--train_batch_size", "8", "--dataloader_num_workers", "0",
           "--num_heldout_samples", "0", "--output_dir", str(out)]
    log = tmp_path / "stderr.txt"
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), text=True)
    deadline = time.time() + 180
    while "caching latents" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    proc.wait(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 75, stderr[-3000:]
    assert time.time() - sent < 30 and (out / "PREEMPTED").is_file()
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.json").exists()  # stopped before step 1


def test_pair_photos_are_stored_once_and_a_corrupt_pair_reads_its_substitutes_photo(bad_shards, shard_dir, tiny_models,
                                                                                    tmp_path):
    """ControlNet's on-disk latent store holds each photo once (the pairs of one photo share one row), and every pair's
    cached latent is the one the uncached path encodes for it: a pair whose sketch is corrupt stands for the next
    readable pair whole, photo included, and a pair carrying another copy of its photo (here a CMYK one) gets its
    own row, as without the cache."""
    from types import SimpleNamespace

    import numpy as np

    from sketch2real.models import load_sd_components
    from sketch2real.shards import ShardSamples
    from sketch2real.sketchy import photo_key
    from sketch2real.training.data import LazyImages
    from sketch2real.training.diffusion import encode_latents
    from sketch2real.training.latent_store import LatentStore

    vae = load_sd_components(str(tiny_models.sd)).vae
    solo = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    stores = {}
    for name, root in (("clean", shard_dir), ("bad", bad_shards[0])):
        pairs = ShardSamples(root, "train", fields=("sketch", "photo"), resolution=32, categories=[CATEGORY])
        photos = LazyImages(pairs, "photo", list(range(len(pairs))))
        store = LatentStore(tmp_path / name, vae, photos, torch.device("cpu"), block=16)
        store.build(solo, list(range(len(photos))), 0, False, False)
        stores[name] = (store, pairs, photos)
    store, pairs, photos = stores["clean"]
    unique = len({photo_key(ref.key) for ref in pairs.refs})
    assert store.stats["unique_images"] == unique < len(photos)
    assert sum(len(np.load(f)) for f in store.folder.glob("block-*.npy")) == unique  # rows stored: one per photo

    store, pairs, photos = stores["bad"]
    items = list(range(len(photos)))
    corrupt = [k for k in items if pairs.where(k) in bad_shards[1]]
    assert any(store.item_slot[k] != store.own_slot[k] for k in corrupt)  # some corrupt pair reads another photo
    with torch.no_grad():
        shape = vae.encode(photos[[0]]).latent_dist.mean.shape[1:]
    eps = torch.randn(len(items), *shape, generator=torch.Generator().manual_seed(0))
    uncached = encode_latents(vae, photos[items], eps)  # each pair as the trainer reads it uncached
    assert torch.allclose(store.latents(items, eps), uncached, rtol=2e-3, atol=2e-3)

    # a restart (a new store on the same folder) reads no pair again: the resolution is kept with the blocks
    def unread(*args):
        raise AssertionError("a resolved pair was read again")

    again = LatentStore(tmp_path / "bad", vae, photos, torch.device("cpu"), block=16)
    original, LazyImages.stands_for = LazyImages.stands_for, unread
    try:
        again.build(solo, items, 0, False, False)
    finally:
        LazyImages.stands_for = original
    assert np.array_equal(again.item_slot, store.item_slot) and again.stats["blocks_encoded_here"] == 0
    assert torch.equal(again.latents(items, eps), store.latents(items, eps))

    # a damaged or crafted map (garbage bytes; a slot past the store's rows) is not trusted: the pairs are read again
    resolved = again.folder / "resolved.npy"
    for damage in (lambda: resolved.write_bytes(b"\x93NUMPY garbage"),
                   lambda: np.save(resolved, np.full(len(items), len(again.members), dtype=np.int64))):
        damage()
        fresh = LatentStore(tmp_path / "bad", vae, photos, torch.device("cpu"), block=16)
        fresh.build(solo, items, 0, False, False)
        assert np.array_equal(fresh.item_slot, store.item_slot)
        assert torch.equal(fresh.latents(items, eps), store.latents(items, eps))


def test_an_output_folder_of_another_trainers_finished_run_is_refused(tiny_models, shard_dir, tmp_path):
    """A ControlNet run into a finished DreamBooth run's folder wrote its files beside the pipeline and replaced its
    card and metrics: a folder that loads as one model and is described as another. One line, nothing written."""
    out = tmp_path / "dreambooth_cat"
    run_script("train/textual_inversion.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
               "--output_dir", out, "--resolution", "32", "--max_train_steps", "1", "--validation_steps", "0",
               "--checkpointing_steps", "0", "--report_to", "none", "--categories", "cat")
    assert json.loads((out / "metrics.json").read_text())["trainer"] == "textual_inversion"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_script("train/controlnet.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
                      "--output_dir", out, "--resolution", "32", "--max_train_steps", "1", "--validation_steps", "0",
                      "--checkpointing_steps", "0", "--report_to", "none", "--categories", "cat", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and f"{out} holds a finished textual_inversion run" in last, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_optimizer_state_of_other_parameter_groups_is_one_line(tmp_path):
    """A checkpoint whose optimizer has other parameter groups than this version builds (a full SD3/FLUX.1 run with
    --train_text_encoder saved before its encoders got a group of their own): torch's refusal, in one line."""
    import torch

    from sketch2real.cli import UserError
    from sketch2real.training.checkpoints import load_checkpoint

    saved = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))])
    now = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [torch.nn.Parameter(torch.ones(2))]}])

    class Accelerator:
        state = type("S", (), {"deepspeed_plugin": None})()

        def load_state(self, folder, **kwargs):
            now.load_state_dict(saved.state_dict())  # what accelerate does with the saved optimizer.bin

    with pytest.raises(UserError, match=r"checkpoint-4 holds an optimizer state of other parameter groups .* start over"):
        load_checkpoint(Accelerator(), tmp_path / "checkpoint-4")


def test_an_output_folder_that_is_the_base_model_or_a_training_run_is_refused_before_anything_is_written(
        tiny_models, shard_dir, tmp_path):
    """--output_dir equal to --pretrained_model_name_or_path: a full DreamBooth replaced the base model's weights in
    place. A generation into a training run's folder replaced its metrics.json: the run, resumed, trained again from
    its start. Both one line, exit 2, the folder as it was."""
    base = tmp_path / "base"
    shutil.copytree(tiny_models.sd, base)
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    proc = run_script("train/dreambooth.py", "--pretrained_model_name_or_path", base, "--output_dir", base, "--shard_dir",
                      shard_dir, "--instance_category", "cat", "--resolution", "32", "--max_train_steps", "1",
                      "--report_to", "none", check=False)
    assert proc.returncode == 2 and "is the base model's folder" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    (run / "metrics.json").write_text('{"trainer": "dreambooth"}')
    for script, args in (("infer/generate.py", ["--pretrained_model_name_or_path", tiny_models.sd, "--prompts", "a cat"]),
                         ("eval/fid.py", ["--generated", shard_dir, "--reference_shards", shard_dir])):
        proc = run_script(script, *args, "--output_dir", run, check=False)
        assert proc.returncode == 2 and "holds a training run" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "run_config.json"]
    assert (run / "metrics.json").read_text() == '{"trainer": "dreambooth"}'


def test_a_cut_short_index_or_a_deleted_shard_is_one_line(tiny_models, shard_dir, tmp_path):
    """A half-written {split}.json was a 30-line JSONDecodeError in every script; a shard the index lists but the disk
    lost, a FileNotFoundError traceback in the trainers."""
    cut, lost = tmp_path / "cut", tmp_path / "lost"
    for folder in (cut, lost):
        shutil.copytree(shard_dir, folder)
    text = (cut / "train.json").read_text()
    (cut / "train.json").write_text(text[: len(text) // 2])
    index = json.loads((lost / "train.json").read_text())
    (lost / index["shards"][0]["name"]).unlink()
    for folder, said in ((cut, "is not JSON"), (lost, "is in the shard index but not on disk")):
        proc = run_script("train/dreambooth.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", folder,
                          "--instance_category", index["shards"][0]["categories"][0], "--resolution", "32",
                          "--max_train_steps", "1", "--report_to", "none", "--output_dir", tmp_path / f"out-{folder.name}",
                          check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and said in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script, data", [
    ("train/dreambooth.py", ["--instance_category", "Cat", "--instance_prompt", "a sks sketch"]),
    ("train/textual_inversion.py", ["--categories", "hot air balloon"]),
    ("train/controlnet.py", ["--split", "trian"]),
])
def test_the_training_data_is_checked_before_any_weight_loads(script, data, tiny_models, shard_dir, tmp_path):
    """A misspelt category or split was found after the model had loaded (minutes for a 12B transformer, on every
    rank). Here the model's weights are unreadable: the data's error comes first, in one line."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models.sd, model)
    for file in model.rglob("*.safetensors"):
        file.write_bytes(b"not weights")
    proc = run_script(script, "--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, *data, "--resolution",
                      "32", "--max_train_steps", "1", "--report_to", "none", "--output_dir", tmp_path / "out", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and ("unknown category" in last or "no shard index" in last), proc.stderr[-2000:]
