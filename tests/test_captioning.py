import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sketch2real.captioning import (
    BEST,
    PROMPTS,
    category_names,
    format_quality,
    hits_category,
    quality_report,
    resolve_prompts,
)

from .helpers import REPO, import_script, launch, run_script


def _rows(folder):
    return [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]


@pytest.fixture
def cap_args(shard_dir):
    return ["--shard_dir", shard_dir, "--split", "test", "--max_new_tokens", "6", "--batch_size", "4", "--num_workers", "0"]


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_every_sample_and_prompt_gets_a_row(family, tiny_models, cap_args, shard_dir, tmp_path):
    from sketch2real.shards import load_index

    out = tmp_path / family
    run_script("infer/caption.py", "--model_name_or_path", getattr(tiny_models, family), *cap_args, "--output_dir", out,
               "--prompts", "best", "1")
    rows = _rows(out)
    keys = [k for s in load_index(shard_dir, "test")["shards"] for k in s["keys"]]
    assert {(r["key"], r["prompt_id"]) for r in rows} == {(k, p) for k in keys for p in [*BEST, "1"]}
    assert len(rows) == len(keys) * 4
    assert all(isinstance(r["caption"], str) and r["prompt"] == PROMPTS[r["prompt_id"]] for r in rows)
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality) == {*BEST, "1"} and quality["1"]["samples"] == len(keys)
    assert quality["1"]["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in rows if r["prompt_id"] == "1") / len(keys))


def test_two_processes_give_the_same_keys_without_duplicates(tiny_models, cap_args, tmp_path):
    args = ["--model_name_or_path", tiny_models.blip2, *cap_args, "--prompts", "1", "2"]
    run_script("infer/caption.py", *args, "--output_dir", tmp_path / "one")
    launch("infer/caption.py", *args, "--output_dir", tmp_path / "two")
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["num_processes"] == 2  # really data-parallel
    pairs = [(r["key"], r["prompt_id"]) for r in two]
    assert len(pairs) == len(set(pairs)) and set(pairs) == {(r["key"], r["prompt_id"]) for r in one}
    assert {p: r["caption"] for p, r in zip(pairs, two)} == {(r["key"], r["prompt_id"]): r["caption"] for r in one}


def test_killed_job_resumes_to_a_complete_duplicate_free_file(tiny_models, cap_args, tmp_path):
    """Slurm's warning (SIGUSR1) stops the job at a batch with PREEMPTED and exit 75 (slurm/caption.sh requeues it);
    a SIGKILL after the rerun started leaves at most a torn row; the last rerun completes without duplicates."""
    out = tmp_path / "cap"
    args = ["--model_name_or_path", tiny_models.llava, *cap_args, "--prompts", "all", "--batch_size", "1",
            "--max_new_tokens", "30", "--output_dir", out]
    part = out / "captions.rank000.jsonl"

    def start_and_signal_at(rows: int, sig: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(REPO / "infer/caption.py"), *map(str, args)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and not (part.exists() and part.read_text().count("\n") >= rows):
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        return proc

    warned = start_and_signal_at(10, signal.SIGUSR1)
    assert warned.returncode == 75 and "captioning stopped after" in (out / "PREEMPTED").read_text()
    start_and_signal_at(part.read_text().count("\n") + 1, signal.SIGKILL)  # once the rerun has written a row
    assert not (out / "PREEMPTED").exists()  # the rerun cleared it: that run was under way
    written_before = part.read_text().count("\n")
    assert written_before >= 20 and not (out / "captions.jsonl").exists()
    run_script("infer/caption.py", *args)
    rows = _rows(out)
    pairs = [(r["key"], r["prompt_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 27 * len(PROMPTS)


def test_a_rerun_with_another_model_is_refused_and_one_with_other_batches_or_categories_continues(tiny_models, cap_args,
                                                                                                    tmp_path):
    """Captions resume only under the settings that wrote them (caption_config.json): another model or length limit
    stops in one line before any model loads and leaves the folder as it was; another batch size or more categories
    continues and captions only the missing samples. An older run's folder (no config) resumes."""
    out, model = tmp_path / "cap", shutil.copytree(tiny_models.blip2, tmp_path / "blip2")
    args = ["--model_name_or_path", model, *cap_args, "--prompts", "1", "--output_dir", out]
    run_script("infer/caption.py", *args, "--categories", "cat")
    first = _rows(out)
    assert first and {r["category"] for r in first} == {"cat"}
    # A sentinel: a sample captioned again would replace its row (the newest row of a pair wins the merge).
    (out / "captions.jsonl").write_text("".join(json.dumps({**r, "caption": "KEPT"}) + "\n" for r in first))
    kept = {name: (out / name).read_bytes() for name in ("captions.jsonl", "caption_config.json")}
    for extra, difference in [
        (["--model_name_or_path", tiny_models.llava], f"model_name_or_path: '{model}' there, '{tiny_models.llava}' now"),
        (["--max_new_tokens", "7"], "max_new_tokens: 6 there, 7 now"),
        (["--mixed_precision", "bf16"], "mixed_precision: 'no' there, 'bf16' now"),  # other words, beside fp32's
    ]:
        proc = run_script("infer/caption.py", *args, "--categories", "cat", *extra, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and f"{out} holds captions of other settings (" in last and difference in last, \
            proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr and all((out / name).read_bytes() == data for name, data in kept.items())
    # the captioner replaced in place (the same path, files of the same sizes): its captions are another model's
    weights_file = max(model.rglob("*.safetensors"), key=lambda f: f.stat().st_size)
    original = weights_file.read_bytes()
    weights_file.write_bytes(original[:-8] + bytes(8))
    proc = run_script("infer/caption.py", *args, "--categories", "cat", check=False)
    assert proc.returncode == 2 and "holds captions of other settings (model_content: " in proc.stderr.strip().splitlines()[-1]
    weights_file.write_bytes(original)
    run_script("infer/caption.py", *args, "--categories", "cat", "airplane", "--batch_size", "3")
    rows = _rows(out)
    assert {r["key"]: r["caption"] for r in rows if r["category"] == "cat"} == {r["key"]: "KEPT" for r in first}
    airplanes = [r for r in rows if r["category"] == "airplane"]
    assert airplanes and len(rows) == len(first) + len(airplanes) and "KEPT" not in {r["caption"] for r in airplanes}
    (out / "caption_config.json").unlink()  # a folder of an older version: resumed as before
    run_script("infer/caption.py", *args, "--categories", "cat", "--max_new_tokens", "7")
    assert {r["key"]: r["caption"] for r in _rows(out) if r["category"] == "cat"} == {r["key"]: "KEPT" for r in first}


def test_the_same_prompts_however_named_are_the_same_captioning_settings():
    """`--prompts best` and `--prompts 4 5 8` caption alike: a rerun naming them the other way continues (refused)."""
    from sketch2real.captioning import caption_settings

    assert caption_settings({"prompts": ["best"]}) == caption_settings({"prompts": ["4", "5", "8"]})
    assert caption_settings({"prompts": ["best"]}) != caption_settings({"prompts": ["4", "5"]})


def test_hit_rate_normalises_awkward_names():
    assert hits_category("A drawing of a car seen from the side.", "car_(sedan)")
    assert hits_category("two sedans", "car_(sedan)")
    assert hits_category("a hot air balloon over hills", "hot-air_balloon")
    assert hits_category("A HOT-AIR BALLOON!", "hot-air_balloon")
    assert hits_category("a carved jack o lantern", "jack-o-lantern")
    assert hits_category("an alligator", "crocodilian")
    assert not hits_category("a cartoon of a scar", "car_(sedan)")  # whole words only
    assert not hits_category("a catalogue", "cat")
    assert "car" in category_names("car_(sedan)") and "car sedan" in category_names("car_(sedan)")
    report = quality_report([
        {"prompt_id": "1", "prompt": "p", "caption": "a cat sitting", "category": "cat", "truncated": False},
        {"prompt_id": "1", "prompt": "p", "caption": "a dog", "category": "cat", "truncated": True},
    ])
    assert report["1"]["hit_rate"] == 0.5 and report["1"]["mean_words"] == 2.5 and report["1"]["truncation_rate"] == 0.5
    # images without a category (an image folder's root) are not misses: the rate is over those with one
    rows = [{"prompt_id": "1", "prompt": "p", "caption": "a cat", "category": "cat"},
            {"prompt_id": "1", "prompt": "p", "caption": "a dog", "category": ""}]
    assert quality_report(rows)["1"]["hit_rate"] == 1.0
    flat = quality_report([{**row, "category": ""} for row in rows])
    assert flat["1"]["hit_rate"] is None and "| 1 | 2 | n/a |" in format_quality(flat)


def test_prompt_library():
    from sketch2real.cli import UserError

    assert list(resolve_prompts(["best"])) == BEST and len(resolve_prompts(["all"])) == 10
    assert resolve_prompts(["3", "describe it"]) == {"3": PROMPTS["3"], "custom-1": "describe it"}
    # a mistake was a prompt of its own ("Best", "4,5,8" captioned with those words as the prompt, exit 0)
    assert resolve_prompts(["Best"]) == resolve_prompts(["best"])
    assert resolve_prompts(["4,5,8"]) == resolve_prompts(["4 5 8"]) == resolve_prompts(["4", "5", "8"])
    for mistake, said in (("bset", "not best, all or a prompt id"), ("4,55", "unknown prompt id 55")):
        with pytest.raises(UserError, match=said):
            resolve_prompts([mistake])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "42"], "unknown prompt id 42"),
        (["--model_name_or_path", "{sd}/text_encoder"], "model family 'clip_text_model' not supported"),
        (["--categories", "unicorn"], "unknown category 'unicorn'"),
        (["--load_in_4bit"], "need a CUDA device"),
        (["--load_in_4bit", "--load_in_8bit"], "--load_in_8bit and --load_in_4bit: give one"),  # a traceback on CUDA
        (["--mixed_precision", "fp16"], "fp16 needs a CUDA device"),  # as generation refuses it (README)
    ],
)
def test_bad_input(tiny_models, cap_args, tmp_path, extra, message):
    extra = [e.format(sd=tiny_models.sd) for e in extra]
    model = [] if "--model_name_or_path" in extra else ["--model_name_or_path", tiny_models.blip2]
    proc = run_script("infer/caption.py", *model, *cap_args, "--output_dir", tmp_path, *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]


def test_empty_input_folder(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("infer/caption.py", "--model_name_or_path", tiny_models.blip2, "--image_dir", tmp_path / "empty",
                      "--output_dir", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no images in" in proc.stderr


def test_an_image_folder_is_cut_to_the_categories_asked_for(tmp_path):
    """--image_dir with --categories captions those categories' folders only (it captioned every folder), and an
    unknown one is one line, as with shards."""
    from PIL import Image

    from sketch2real.cli import UserError

    for category in ("cat", "dog"):
        (tmp_path / category).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / category / f"{i}.png")
    folder_items = import_script("infer/caption.py")._folder_items
    assert sorted(item["key"] for item in folder_items(str(tmp_path), 0, 1, ["cat"])) == ["cat/0", "cat/1"]
    assert len(folder_items(str(tmp_path), 0, 1, [])) == 4
    with pytest.raises(UserError, match="unknown category 'cow'"):
        folder_items(str(tmp_path), 0, 1, ["cow"])
    # two files of one name: one key, and one image's captions were lost to the other's (a one-line refusal now)
    Image.new("RGB", (32, 32)).save(tmp_path / "cat" / "0.jpg")
    with pytest.raises(UserError, match=r"cat/0.jpg and .*cat/0.png would both be captioned as cat/0: rename one"):
        folder_items(str(tmp_path), 0, 1, [])


def test_corrupt_images_met_by_the_decoding_workers_are_counted(tiny_models, cap_args, shard_dir, tmp_path):
    """A corrupt sketch in the shards, decoded by DataLoader workers (the default 2): skipped, and counted in
    metrics.json with its key (the workers' record stayed in their processes: count 0, as if none were corrupt)."""
    import shutil

    from .helpers import corrupt_one_sketch

    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    name, key = corrupt_one_sketch(broken, "test")
    args = [a if a != str(shard_dir) else str(broken) for a in map(str, cap_args)]
    args[args.index("--num_workers") + 1] = "2"
    run_script("infer/caption.py", "--model_name_or_path", tiny_models.blip2, *args, "--prompts", "1", "--output_dir",
               tmp_path / "out")
    corrupt = json.loads((tmp_path / "out" / "metrics.json").read_text())["corrupt_samples"]
    assert corrupt == {"count": 1, "keys": [f"{name}:{key}"]}
    assert key not in {r["key"] for r in _rows(tmp_path / "out")}


def test_captions_resume_from_shards_copied_elsewhere_not_from_rebuilt_ones(tiny_models, cap_args, shard_dir, tmp_path):
    """The shards are known by their index: a copy at another path (or the path with a trailing slash) continues the
    captions; shards rebuilt at the same path (other images under the same keys) are refused in one line (their
    old captions were kept silently beside the new images)."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    out = tmp_path / "cap"
    args = ["--model_name_or_path", tiny_models.blip2, *[a for a in map(str, cap_args)], "--prompts", "1",
            "--categories", "cat", "--output_dir", str(out)]
    at = args.index("--shard_dir") + 1
    args[at] = str(shards)
    run_script("infer/caption.py", *args)
    rows = _rows(out)
    (out / "captions.jsonl").write_text("".join(json.dumps({**r, "caption": "KEPT"}) + "\n" for r in rows))
    shutil.copytree(shards, tmp_path / "elsewhere")
    for path in (str(tmp_path / "elsewhere"), f"{shards}/"):
        args[at] = path
        run_script("infer/caption.py", *args)
        assert {r["caption"] for r in _rows(out)} == {"KEPT"}
    index = json.loads((shards / "test.json").read_text())
    index["shards"][0]["fingerprint"] = "0" * 16  # as make_shards writes a shard whose images changed
    (shards / "test.json").write_text(json.dumps(index))
    args[at] = str(shards)
    proc = run_script("infer/caption.py", *args, check=False)
    assert proc.returncode == 2 and f"{out} holds captions of other settings (shard_dir: " in proc.stderr, proc.stderr[-1500:]


def test_an_image_folder_is_read_batch_by_batch_and_its_corrupt_images_counted(tiny_models, tmp_path):
    """--image_dir: images are read when their batch comes (all of them were decoded first: ~19 GB for 75k
    sketches), readable ones captioned, an unreadable one skipped and counted in metrics.json."""
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 90, 200)).save(folder / "cat" / f"{i}.png")
    (folder / "cat" / "broken.png").write_bytes(b"\x00not a png")
    items = import_script("infer/caption.py")._folder_items(str(folder), 0, 1, [])
    assert len(items) == 4 and not any("image" in item for item in items)  # paths only: nothing decoded yet
    run_script("infer/caption.py", "--model_name_or_path", tiny_models.blip2, "--image_dir", folder, "--prompts", "1",
               "--max_new_tokens", "4", "--batch_size", "2", "--output_dir", tmp_path / "out")
    assert sorted(r["key"] for r in _rows(tmp_path / "out")) == ["cat/0", "cat/1", "cat/2"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["corrupt_samples"]["count"] == 1
