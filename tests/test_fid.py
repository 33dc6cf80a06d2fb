import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .helpers import launch, run_script


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
    for i in range(24):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(root / "a" / f"{i:03d}.png")
        dark = (rng.random((64, 64, 3)) * 120).astype("uint8")
        dark[:, :32] = 200
        Image.fromarray(dark).save(root / "b" / f"{i:03d}.png")
    # and a phone's JPEG, shown turned by its EXIF orientation: pytorch-fid (and clean-fid) read its pixels as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to show
    Image.fromarray(dark).save(root / "b" / "phone.jpg", exif=exif)
    return root


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _fid(args) -> dict:
    """metrics.json, read by a strict parser (a bare NaN or Infinity fails, as in jq or JavaScript)."""
    return json.loads((args / "metrics.json").read_text(), parse_constant=_refuse_constant)


def test_metrics_files_are_strict_json_where_a_value_is_missing(tmp_path):
    """An interval that cannot be computed (one image) is null, not NaN: in metrics.json and in JSONL logs."""
    from sketch2real.io import write_json
    from sketch2real.metrics import mean_ci95

    write_json(tmp_path / "metrics.json", {"clip_score_ci95": mean_ci95([0.3]), "kid": float("inf"), "n": 1, "ok": 0.5})
    assert _fid(tmp_path) == {"clip_score_ci95": [None, None], "kid": None, "n": 1, "ok": 0.5}
    # JSONL too (validation_log.jsonl had `[NaN, NaN]` for an interval of one validation image)
    from sketch2real.io import append_jsonl, write_jsonl

    row = {"step": 2, "validation_sketchiness_ci95": mean_ci95([0.3])}
    write_jsonl(tmp_path / "rows.jsonl", [row])
    append_jsonl(tmp_path / "rows.jsonl", [row])
    assert [json.loads(line, parse_constant=_refuse_constant) for line in (tmp_path / "rows.jsonl").read_text().splitlines()] \
        == [{"step": 2, "validation_sketchiness_ci95": [None, None]}] * 2


@pytest.mark.parametrize("dims", [64, 768])  # 2048 works the same; its 2048x2048 sqrtm costs a minute per run
def test_equals_pytorch_fid_cli(folders, tmp_path, dims, tiny_models):
    cli = subprocess.run([sys.executable, "-m", "pytorch_fid", str(folders / "a"), str(folders / "b"), "--device", "cpu",
                          "--dims", str(dims), "--batch-size", "50", "--num-workers", "0"],
                         capture_output=True, text=True, check=True)
    theirs = float(re.search(r"FID:\s+([0-9.eE+-]+)", cli.stdout)[1])
    run_script("eval/fid.py", "--generated", folders / "a", "--reference_dir", folders / "b", "--output_dir", tmp_path,
               "--dims", dims, "--no_cache", "--batch_size", "7")
    ours = _fid(tmp_path)["sets"]["a"]["fid"]
    assert abs(ours - theirs) < 1e-3, (ours, theirs)
    assert theirs > 1  # the sets differ: a real comparison, not 0 == 0


def test_identical_sets_score_zero_and_a_shifted_set_scores_higher(shard_dir, tmp_path, tiny_models):
    from accelerate import PartialState

    from sketch2real.evaluation import features_of
    from sketch2real.extractors import inception_extractor
    from sketch2real.metrics import fid_from_features, kid, shard_set

    state = PartialState()
    model = inception_extractor(64, state.device, batch_size=16, num_workers=0)
    photos_test = features_of(shard_set(shard_dir, "test", "photo"), model, state, None)[0]
    photos_train = features_of(shard_set(shard_dir, "train", "photo"), model, state, None)[0]
    sketches_test = features_of(shard_set(shard_dir, "test", "sketch"), model, state, None)[0]
    assert abs(fid_from_features(photos_test, photos_test)) < 1e-3
    assert abs(kid(photos_test, photos_test)[0]) < abs(kid(sketches_test, photos_test)[0])
    near, far = fid_from_features(photos_train, photos_test), fid_from_features(sketches_test, photos_test)
    assert near < far, (near, far)
    assert kid(photos_train, photos_test)[0] < kid(sketches_test, photos_test)[0]


def test_reference_cache_hit_and_invalidation(folders, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(folders / "b", ref)
    args = ["--generated", folders / "a", "--reference_dir", ref, "--dims", "64", "--cache_dir", tmp_path / "cache"]
    run_script("eval/fid.py", *args, "--output_dir", tmp_path / "1")
    run_script("eval/fid.py", *args, "--output_dir", tmp_path / "2")
    first, second = _fid(tmp_path / "1"), _fid(tmp_path / "2")
    assert not first["reference"]["cache_hit"] and second["reference"]["cache_hit"]
    assert "clip_accuracy_classes" not in first  # not asked for
    assert first["sets"]["a"]["fid"] == second["sets"]["a"]["fid"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # on 2 processes too (the other rank holds no cached features: it crashed joining its empty mask)
    launch("eval/fid.py", *args, "--output_dir", tmp_path / "ddp")
    ddp = _fid(tmp_path / "ddp")
    assert ddp["reference"]["cache_hit"] and ddp["num_processes"] == 2 and ddp["sets"]["a"]["fid"] == first["sets"]["a"]["fid"]
    Image.new("RGB", (64, 64), "red").save(ref / "000.png")  # the set changed: statistics are recomputed
    run_script("eval/fid.py", *args, "--output_dir", tmp_path / "3")
    third = _fid(tmp_path / "3")
    assert not third["reference"]["cache_hit"] and third["sets"]["a"]["fid"] != first["sets"]["a"]["fid"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_cached_statistics_and_probes_are_keyed_by_the_decoder(folders, monkeypatch):
    """A reference cached by a version that read 16-bit PNGs as 8-bit (or without EXIF rotation) was served to the
    next version (FID 0.90 cached, 20.34 computed): the key names `shards.DECODER_VERSION` (the probe's key is built
    from the same fingerprints)."""
    from sketch2real import metrics

    images = metrics.folder_set(str(folders / "a"))
    key = metrics.fingerprint(images, {"dims": 64})
    assert metrics.fingerprint(images, {"dims": 64}) == key
    monkeypatch.setattr(metrics, "DECODER_VERSION", metrics.DECODER_VERSION + "+another decoder")
    assert metrics.fingerprint(images, {"dims": 64}) != key


def test_generated_folder_against_shards_per_category_two_processes(tiny_models, shard_dir, tmp_path):
    gen = tmp_path / "gen"
    run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
               "--split", "test", "--height", "64", "--width", "64", "--num_inference_steps", "2",
               "--prompt_template", "a photo of a {category}", "--output_dir", gen, "--batch_size", "8")
    few, broken = tmp_path / "few", tmp_path / "broken"  # fewer images than a batch: one rank extracts none of them;
    few.mkdir()                                            # 16 and 3 unreadable: rank 1's are all unreadable
    broken.mkdir()
    for i, image in enumerate(sorted((gen / "images").rglob("*.png"))[:16]):
        if i < 5:
            shutil.copy(image, few / image.name)
        shutil.copy(image, broken / f"{i:02d}.png")
    for i in range(16, 19):
        (broken / f"{i:02d}.png").write_bytes(b"\x89PNG cut short")
    common = ["--generated", f"tiny={gen}", f"again={gen}", f"few={few}", f"broken={broken}", "--reference_shards",
              shard_dir, "--dims", "64", "--no_cache", "--batch_size", "16", "--metrics", "fid", "kid", "fd_dinov2", "cmmd",
              "--dinov2_model_name_or_path", tiny_models.dinov2, "--clip_model_name_or_path", tiny_models.clip]
    run_script("eval/fid.py", *common, "--output_dir", tmp_path / "one")
    # several sets: all gathered before rank 0 scores; 27 images in batches of 16 on 2 ranks, `few` all on rank 1
    # (rank 0's empty part has no feature width, nor rank 1's part of `broken`: unreadable images only)
    launch("eval/fid.py", *common, "--output_dir", tmp_path / "two")
    one, two = _fid(tmp_path / "one"), _fid(tmp_path / "two")
    assert two["num_processes"] == 2  # really data-parallel
    assert set(two["sets"]) == {"tiny", "again", "few", "broken"} and two["sets"]["broken"]["n_generated"] == 16
    for name in two["sets"]:
        for metric in ("fid", "fd_dinov2", "cmmd"):  # every extractor's features gathered from both ranks in order
            assert one["sets"][name][metric] == two["sets"][name][metric], metric
        assert one["sets"][name]["per_category"].keys() == two["sets"][name]["per_category"].keys()
    per_category = one["sets"]["tiny"]["per_category"]
    assert set(per_category) == {"airplane", "apple", "car_(sedan)", "cat", "hot-air_balloon"}
    assert sum(c["n_generated"] for c in per_category.values()) == one["sets"]["tiny"]["n_generated"]
    tiny = one["sets"]["tiny"]
    # the reference is the test photos, each once (a sample is a sketch/photo pair: it named a photo per sketch);
    # pairing still pairs every generated image with its own sample's photo
    from sketch2real.metrics import shard_set
    from sketch2real.sketchy import photo_key

    test_keys = shard_set(shard_dir, "test", "photo").sample_keys
    assert one["reference"]["n"] == len({photo_key(k) for k in test_keys}) < len(test_keys)
    assert tiny["pairing"]["pairs"] == tiny["n_generated"] == len(test_keys)
    # metrics.json contract: KID and the pairing gain with their 95% intervals, per set and per category
    assert tiny["kid_ci95"][0] <= max(tiny["kid"], 0.0) <= tiny["kid_ci95"][1] and "jackknife" in tiny["kid_ci95_method"]
    assert tiny["kid_ci95"][1] == pytest.approx(max(0.0, tiny["kid"] + 1.96 * tiny["kid_se"]))
    # 64-dim features of a few dozen images: no honest FID interval (tests/test_intervals.py), and the reason says so
    assert tiny["fid_ci95"] is None and "no honest interval" in tiny["fid_ci95_reason"] and "KID" in tiny["fid_ci95_reason"]
    assert all(c["fid_ci95"] is None and c["fid_ci95_reason"] for c in per_category.values())
    assert tiny["pairing_gain_ci95"][0] <= tiny["pairing_gain"] <= tiny["pairing_gain_ci95"][1]
    assert all(len(c["kid_ci95"]) == 2 for c in per_category.values() if c["kid"] is not None)
    # identical sets: the difference is exactly 0 and not distinguishable
    assert len(one["differences"]) == 6
    same = next(d for d in one["differences"] if {d["a"], d["b"]} == {"tiny", "again"})
    assert same["kid_difference"] == 0 and same["verdict"] == "not distinguishable"
    # generate.py's sets pair the images of one item (index.jsonl key): every image here
    assert same["pairs"] == tiny["n_generated"] and "pairs" in same["kid_difference_ci95_method"]
    report = (tmp_path / "one" / "report.md").read_text()
    assert "| tiny |" in report and "## tiny per category" in report and "Warning" in report
    assert Image.open(tmp_path / "one" / "fid_per_category.png").size[0] > 300


def test_features_do_not_depend_on_the_number_of_processes(tiny_models, tmp_path):
    """Each rank extracts whole batches of the one-process run: a rank's half of 16 images (8) gave Inception's 2048
    features other last bits than the batch of 16 (FID moved in its 7th digit from 1 to 2 processes)."""
    import torch

    from sketch2real.metrics import extract_features, folder_set, inception, rank_range

    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    images, cpu, threads = folder_set(str(tmp_path)), torch.device("cpu"), torch.get_num_threads()
    model = inception(2048, cpu)
    torch.set_num_threads(1)  # as each of the suite's processes, where a batch's make-up shows
    try:
        one, _ = extract_features(images, model, 2048, cpu, 16, 0, progress=False)
        two = np.concatenate([extract_features(images, model, 2048, cpu, 16, 0, rank, 2, progress=False)[0]
                              for rank in (0, 1)])
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, two)
    # every image once, in order, in whole batches, whatever the processes (some get none)
    for count, batch, world in [(27, 50, 2), (27, 4, 3), (100, 7, 8), (5, 2, 8)]:
        ranges = [rank_range(count, batch, rank, world) for rank in range(world)]
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and (ranges[0][0], ranges[-1][1]) == (0, count)
        assert all(start % batch == 0 for start, _ in ranges)


def test_unreadable_image_is_reported_and_skipped(folders, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(folders / "a", gen)
    (gen / "999.png").write_bytes(b"not an image")
    proc = run_script("eval/fid.py", "--generated", gen, "--reference_dir", folders / "b", "--output_dir", tmp_path / "o",
                      "--dims", "64", "--no_cache")
    assert "corrupt sample" in proc.stderr and "999.png" in proc.stderr
    assert _fid(tmp_path / "o")["corrupt_samples"] == {"count": 1, "keys": ["gen:999.png"]}
    result = _fid(tmp_path / "o")["sets"]["gen"]
    assert result["unreadable"] == 1 and result["n_generated"] == 24


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generated", "{empty}"], "no images in"),
        (["--dims", "100"], "--dims must be one of"),
        (["--generated", "/no/such/dir"], "image folder not found"),
        (["--max_samples", "5"], "the reference's images name no Sketchy samples"),  # said "has 0 samples"
    ],
)
def test_bad_input(folders, tmp_path, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.format(empty=tmp_path / "empty") for e in extra]
    base = ["--generated", folders / "a"] if "--generated" not in extra else []
    proc = run_script("eval/fid.py", *base, "--reference_dir", folders / "b", "--output_dir", tmp_path / "o", *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]


def test_clip_score_matches_clip_logits(tiny_models, shard_dir, tmp_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from sketch2real.metrics import clip_score_of, clip_scores

    gen = tmp_path / "gen"
    run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
               "--split", "test", "--height", "64", "--width", "64", "--num_inference_steps", "2", "--max_per_category", "1",
               "--prompt_template", "a photo of a {category}", "--output_dir", gen)
    run_script("eval/fid.py", "--generated", f"g={gen}", "--reference_shards", shard_dir, "--dims", "64", "--no_cache",
               "--output_dir", tmp_path / "o", "--clip_model_name_or_path", tiny_models.clip)
    reported = _fid(tmp_path / "o")["sets"]["g"]["clip_score"]
    rows = [json.loads(line) for line in (gen / "index.jsonl").read_text().splitlines()]
    model, processor = CLIPModel.from_pretrained(tiny_models.clip), CLIPProcessor.from_pretrained(tiny_models.clip)
    images = [Image.open(gen / r["image"]).convert("RGB") for r in rows]
    with torch.no_grad():
        out = model(**processor(text=[r["prompt"] for r in rows], images=images, return_tensors="pt", padding=True))
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert reported == pytest.approx(max(float((100 * cosine).mean()), 0.0), abs=1e-4)  # torchmetrics: the mean, clamped
    assert reported == pytest.approx(clip_score_of(clip_scores([gen / r["image"] for r in rows], [r["prompt"] for r in rows],
                                                               str(tiny_models.clip), torch.device("cpu")))[0], abs=1e-6)


def test_rank_zero_scores_only_after_every_collective(monkeypatch, tmp_path):
    """No collective may wait behind rank-0-only scoring (per-category FID, CLIP score): past NCCL's timeout."""
    from types import SimpleNamespace

    import sketch2real.evaluation as evaluation

    events = []
    import sketch2real.extractors as extractors

    monkeypatch.setattr(extractors, "inception_extractor", lambda *a: None)
    monkeypatch.setattr(evaluation, "features_of", lambda images, *a: (events.append(("gather", images.name)),
                                                                        np.zeros((2, 4)), np.ones(2, bool), False)[1:])
    monkeypatch.setattr(evaluation, "evaluate_set", lambda name, *a, **k: events.append(("score", name)) or {})
    monkeypatch.setattr(evaluation, "clip_scores", lambda *a: events.append(("clip", None)) or np.zeros(2))
    monkeypatch.setattr(evaluation, "write_json", lambda *a: None)
    monkeypatch.setattr(evaluation, "format_report", lambda report: "")
    monkeypatch.setattr(evaluation, "bar_chart", lambda *a: None)
    from sketch2real.metrics import ImageSet

    sets = [ImageSet(n, [Path("x.png")], ["x"], [""], [""], prompts=["p"]) for n in ("a", "b", "c")]
    opts = SimpleNamespace(dims=4, cache_dir="", no_cache=True, seed=0, clip_model_name_or_path="clip", output_dir=str(tmp_path),
                           channels_last=False, batch_size=2, num_workers=0, resize=0, metrics=["fid", "kid"],
                           clean_resize=False, dinov2_model_name_or_path="", bootstrap_resamples=10)
    reference = ImageSet("ref", [Path("a.png"), Path("b.png")], ["a", "b"], ["", ""], ["", ""])
    for rank in (0, 1):
        events.clear()
        state = SimpleNamespace(device="cpu", is_main_process=rank == 0, num_processes=1, process_index=rank)
        evaluation.run_fid(opts, sets, reference, state)
        kinds = [kind for kind, _ in events]
        assert kinds[:4] == ["gather"] * 4 and "gather" not in kinds[4:]
        assert kinds[4:] == (["score", "clip"] * 3 if rank == 0 else [])


def test_kid_s_subset_size_is_recorded_beside_its_std():
    """kid_std depends on the subsets' size, halved below 1,000 images (0.262 at 150 images against 0.150 with
    subsets of 100): metrics.json says which, so it compares with another tool's."""
    from sketch2real.evaluation import score

    rng = np.random.default_rng(0)
    result = score(rng.normal(size=(20, 8)), rng.normal(size=(30, 8)), dims=8, seed=0, resamples=2)
    assert result["kid_subset_size"] == 10
    from sketch2real.metrics import kid_subset_size

    assert kid_subset_size(3000, 2000) == 1000 and kid_subset_size(1000, 5000) == 500 and kid_subset_size(3, 9) == 3


@pytest.mark.parametrize("dims, n_a, n_b", [(64, 40, 30), (64, 300, 200), (256, 100, 300), (256, 400, 50)])
def test_fast_frechet_distance_equals_pytorch_fids(dims, n_a, n_b):
    """Fewer images than dimensions (Gram-matrix path) and more (eigendecomposition path): pytorch-fid's value."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    from sketch2real.metrics import fid_from_features, statistics

    rng = np.random.default_rng(dims + n_a)
    a = rng.standard_normal((n_a, dims)).astype(np.float32) ** 2
    b = (rng.standard_normal((n_b, dims)) * 1.2 + 0.3).astype(np.float32) ** 2
    theirs = calculate_frechet_distance(*statistics(a), *statistics(b))
    assert fid_from_features(a, b) == pytest.approx(theirs, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0, abs=1e-6 * theirs)


def test_intervals_say_which_differences_are_distinguishable():
    from sketch2real.metrics import kid_difference, mean_ci95, mmd2_unbiased, pairing_score, verdict

    x, y = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [2.0, 1.0]])
    k = lambda u, v: (u @ v / 2 + 1) ** 3  # noqa: E731  KID's kernel, written out
    by_hand = (sum(k(x[i], x[j]) for i in range(3) for j in range(3) if i != j) / 6 + 2 * k(y[0], y[1]) / 2
               - 2 * sum(k(a, b) for a in x for b in y) / 6)
    assert mmd2_unbiased(x, y) == pytest.approx(by_hand)

    rng = np.random.default_rng(0)
    reference, a, b = rng.normal(size=(80, 16)), rng.normal(size=(60, 16)), rng.normal(size=(60, 16))
    shifted = rng.normal(size=(60, 16)) + 0.7
    same = kid_difference(a, b, reference)
    assert same["kid_difference_ci95"][0] < 0 < same["kid_difference_ci95"][1]
    assert verdict(same["kid_difference_ci95"]) == "not distinguishable"
    worse = kid_difference(shifted, a, reference)
    assert worse["kid_difference"] == pytest.approx(mmd2_unbiased(shifted, reference) - mmd2_unbiased(a, reference))
    assert worse["kid_difference_ci95"][0] > 0 and verdict(worse["kid_difference_ci95"]) == "significant"

    values = rng.normal(1.0, 1.0, 400)
    low, high = mean_ci95(values)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)

    paired = pairing_score(a + 0.3 * rng.normal(size=a.shape), a)  # each image near its own reference
    assert paired["gain_ci95"][0] > 0
    unpaired = pairing_score(b, a)
    assert unpaired["gain_ci95"][0] < 0 < unpaired["gain_ci95"][1]


def test_cmmd_is_its_formula_and_zero_for_identical_sets():
    from sketch2real.metrics import cmmd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(1.0, 2.0, size=(9, 5))

    def k(u, v):
        return np.exp(-np.sum((u - v) ** 2) / (2 * 10.0**2))

    def mean_k(a, b):
        return np.mean([[k(u, v) for v in b] for u in a])

    assert cmmd(x, y) == pytest.approx(1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)), rel=1e-9)
    assert abs(cmmd(x, x)) < 1e-9 and cmmd(x, y) > 1e-3


def test_prdc_on_hand_made_points():
    """Reals on a line 1 apart (k=1: every ball has radius 1); one fake near the first two reals, one far away."""
    from sketch2real.metrics import prdc

    real = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0]])
    fake = np.array([[0.5, 0], [10, 0]])
    values = prdc(real, fake, k=1)
    assert values["precision"] == 0.5  # the far fake is in no real ball
    assert values["density"] == 1.0  # the near fake is in two balls, the far one in none: (2 + 0) / 2 / k
    assert values["coverage"] == 0.5  # reals 0 and 1 have a fake inside their ball, 2 and 3 do not
    assert values["recall"] == 1.0  # the fakes' balls (radius 9.5) hold every real
    assert values["precision_items"].tolist() == [1.0, 0.0] and values["coverage_items"].tolist() == [1, 1, 0, 0]


def test_frechet_distance_is_the_formula_in_one_dimension():
    """FD of two 1-D Gaussians is (mu1 - mu2)^2 + (sigma1 - sigma2)^2 (with the sets' own statistics)."""
    from sketch2real.metrics import fid_from_features

    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (500, 1)), rng.normal(2, 3, (400, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)


def test_zero_shot_accuracy_on_hand_made_embeddings():
    from sketch2real.metrics import zero_shot_correct

    classes = np.eye(3)
    images = np.array([[0.9, 0.1, 0], [0, 0.2, 0.8], [0.6, 0.5, 0]])
    assert zero_shot_correct(images, ["cat", "dog", "dog"], classes, ["cat", "car", "dog"]).tolist() == [1.0, 1.0, 0.0]


def _photo_folders(shard_dir, root):
    """The test photos as files, each once as the reference holds them, and a blurred copy of them (a degraded set)."""
    from PIL import ImageFilter

    from sketch2real.evaluation import distinct_images
    from sketch2real.metrics import open_images, shard_set

    photos = shard_set(str(shard_dir), "test", "photo")
    distinct = distinct_images(photos)
    sources = [s for s, keep in zip(photos.sources, distinct) if keep]
    categories = [c for c, keep in zip(photos.categories, distinct) if keep]
    for name in ("same", "blurred"):
        (root / name).mkdir()
    rows = []
    for i, (image, category) in enumerate(zip(open_images(sources), categories)):
        image.save(root / "same" / f"{i:03d}.png")
        image.filter(ImageFilter.GaussianBlur(4)).save(root / "blurred" / f"{i:03d}.png")
        rows.append(json.dumps({"key": f"{i:03d}", "image": f"{i:03d}.png", "category": category,
                                "prompt": f"a photo of a {category}"}))
    for name in ("same", "blurred"):
        (root / name / "index.jsonl").write_text("\n".join(rows) + "\n")


def test_every_metric_with_intervals_per_set_and_category_identical_and_degraded(tiny_models, shard_dir, tmp_path):
    _photo_folders(shard_dir, tmp_path)
    run_script("eval/fid.py", "--generated", f"same={tmp_path / 'same'}", f"blurred={tmp_path / 'blurred'}",
               "--reference_shards", shard_dir, "--reference_field", "photo", "--metrics", "fd_dinov2", "cmmd", "prdc",
               "clip_accuracy", "clip_score", "--dinov2_model_name_or_path", tiny_models.dinov2,
               "--clip_model_name_or_path", tiny_models.clip, "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "o",
               "--bootstrap_resamples", "20")
    report = _fid(tmp_path / "o")
    same, blurred = report["sets"]["same"], report["sets"]["blurred"]
    assert abs(same["fd_dinov2"]) < 1e-3 and abs(same["cmmd"]) < 1e-3
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert blurred["fd_dinov2"] > 0.01 and blurred["cmmd"] > 1e-3  # a degraded copy scores worse than the set itself
    assert all(blurred[m] <= same[m] for m in ("precision", "recall", "coverage"))
    # 32-dim DINOv2 features of fewer than 64 images: no honest FD-DINOv2 interval, and the reason says so
    assert same["fd_dinov2_ci95"] is None and "no honest interval" in same["fd_dinov2_ci95_reason"]
    for metric in ("cmmd", "clip_accuracy", "clip_score"):
        low, high = same[f"{metric}_ci95"]
        assert low <= high, metric
    for metric in ("precision", "recall", "density", "coverage"):  # k-NN balls shared by every image: no interval
        assert same[f"{metric}_ci95"] is None and "no honest interval" in same[f"{metric}_ci95_reason"], metric
    for category, values in same["per_category"].items():
        assert {"fd_dinov2_ci95", "cmmd_ci95", "precision_ci95", "clip_accuracy_ci95"} <= set(values), category
    assert 0.0 <= same["clip_accuracy"] <= 1.0 and "fid" not in same
    assert report["reference"]["cache_hits"] == {"clip": False, "dinov2": False}
    text = (tmp_path / "o" / "report.md").read_text()
    assert "Beyond Inception" in text and "FD-DINOv2" in text and "CMMD" in text
    run_script("eval/fid.py", "--generated", f"same={tmp_path / 'same'}", "--reference_shards", shard_dir, "--metrics",
               "fd_dinov2", "--dinov2_model_name_or_path", tiny_models.dinov2, "--cache_dir", tmp_path / "cache",
               "--output_dir", tmp_path / "again")
    assert _fid(tmp_path / "again")["reference"]["cache_hits"] == {"dinov2": True}
    run_script("eval/fid.py", "--generated", f"same={tmp_path / 'same'}", "--reference_shards", shard_dir, "--metrics",
               "fd_dinov2", "--dinov2_model_name_or_path", tiny_models.dinov2, "--cache_dir", tmp_path / "cache",
               "--no_cache", "--output_dir", tmp_path / "uncached")  # --no_cache wins over a --cache_dir (it read it)
    assert _fid(tmp_path / "uncached")["reference"]["cache_hits"] == {"dinov2": False}
    # Weights replaced in place (retrained, or another revision downloaded) are not the features cached before: they
    # were, keyed by the model's path alone (a set against its own copy then scored as far from it)
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "dinov2"
    shutil.copytree(tiny_models.dinov2, model)
    fd_dinov2 = {}
    for run in ("before", "retrained"):
        run_script("eval/fid.py", "--generated", f"same={tmp_path / 'same'}", "--reference_shards", shard_dir, "--metrics",
                   "fd_dinov2", "--dinov2_model_name_or_path", model, "--cache_dir", tmp_path / "cache", "--output_dir",
                   tmp_path / run)
        fd_dinov2[run] = _fid(tmp_path / run)["sets"]["same"]["fd_dinov2"]
        assert _fid(tmp_path / run)["reference"]["cache_hits"] == {"dinov2": False}, run
        weights = load_file(model / "model.safetensors")
        save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}, model / "model.safetensors")
    assert abs(fd_dinov2["retrained"]) < 1e-3, fd_dinov2


def test_a_set_of_fewer_categories_than_the_reference_is_said(tiny_models, shard_dir, tmp_path):
    """A generation of some categories scored against all of them: its overall scores mix in the missing ones."""
    import shutil

    _photo_folders(shard_dir, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "same" / "index.jsonl").read_text().splitlines()]
    (tmp_path / "cats").mkdir()
    kept = [r for r in rows if r["category"] == "cat"]
    for r in kept:
        shutil.copy(tmp_path / "same" / r["image"], tmp_path / "cats" / r["image"])
    (tmp_path / "cats" / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    # and a set with an image of a category the reference has none of: counted against the others, silently
    shutil.copytree(tmp_path / "same", tmp_path / "zebra")
    (tmp_path / "zebra" / "index.jsonl").write_text("".join(json.dumps({**r, "category": "zebra"} if i == 0 else r) + "\n"
                                                            for i, r in enumerate(rows)))
    run_script("eval/fid.py", "--generated", f"cats={tmp_path / 'cats'}", f"same={tmp_path / 'same'}",
               f"zebra={tmp_path / 'zebra'}", "--reference_shards", shard_dir, "--reference_field", "photo", "--metrics",
               "clip_accuracy", "--clip_model_name_or_path", tiny_models.clip, "--no_cache", "--output_dir", tmp_path / "o")
    sets = _fid(tmp_path / "o")["sets"]
    assert "its images are of 1 of the reference's 5 categories" in sets["cats"]["warning"]
    assert "warning" not in sets["same"]
    assert "1 of its images are of categories the reference has none of (zebra)" in sets["zebra"]["warning"]
    assert "Warning (cats): its images are of 1" in (tmp_path / "o" / "report.md").read_text()


def test_clip_accuracy_chooses_among_every_category_where_the_reference_keeps_one(tiny_models, shard_dir, tmp_path):
    """--categories cat: the zero-shot classifier still chooses among every category of the split (among one, each
    image is right and the content verdict says nothing), and chance is one in that many; the generated set is cut
    to the cat images as the reference is (all its images were scored against the cat photos)."""
    from sketch2real.metrics import shard_set

    _photo_folders(shard_dir, tmp_path)
    run_script("eval/fid.py", "--generated", f"same={tmp_path / 'same'}", "--reference_shards", shard_dir,
               "--reference_field", "photo", "--categories", "cat", "--metrics", "clip_accuracy", "sketchiness",
               "--clip_model_name_or_path", tiny_models.clip, "--no_cache", "--output_dir", tmp_path / "o",
               "--bootstrap_resamples", "10")
    report = _fid(tmp_path / "o")
    photos = shard_set(str(shard_dir), "test", "photo")
    every, every_image = len(set(photos.categories)), len(photos)
    assert every > 1 and report["clip_accuracy_classes"] == every
    assert report["style_content"]["same"]["chance"] == 1 / every
    from sketch2real.evaluation import distinct_images

    cats = shard_set(str(shard_dir), "test", "photo", ["cat"])  # each photo once
    assert report["sets"]["same"]["n_generated"] == report["reference"]["n"] == distinct_images(cats).sum() < every_image


def test_clean_resize_is_named_and_changes_inception_features(folders, tmp_path, tiny_models):
    from sketch2real.metrics import clean_resize

    image = Image.open(next((folders / "a").glob("*.png"))).convert("RGB")
    resized = clean_resize(image, 299)
    channel = Image.fromarray(np.asarray(image, np.float32)[..., 1], mode="F").resize((299, 299), Image.BICUBIC)
    assert resized.shape == (3, 299, 299) and np.allclose(resized[1].numpy(), np.clip(np.asarray(channel) / 255, 0, 1))
    for name, extra in (("plain", []), ("clean", ["--clean_resize"])):
        run_script("eval/fid.py", "--generated", folders / "a", "--reference_dir", folders / "b", "--dims", "64", "--no_cache",
                   "--output_dir", tmp_path / name, *extra)
    plain, clean = _fid(tmp_path / "plain"), _fid(tmp_path / "clean")
    assert "clean-fid" in clean["resize"] and "clean-fid" in (tmp_path / "clean" / "report.md").read_text()
    assert "pytorch-fid" in plain["resize"] and abs(plain["sets"]["a"]["fid"] - clean["sets"]["a"]["fid"]) > 1e-6


def test_unknown_metric_is_a_one_line_error(folders, tmp_path):
    result = run_script("eval/fid.py", "--generated", folders / "a", "--reference_dir", folders / "b", "--metrics", "fid", "is",
                        "--output_dir", tmp_path, check=False)
    assert result.returncode != 0 and "unknown metric 'is'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_mmd_is_computed_in_blocks_with_the_dense_value():
    """KID's MMD² at full Sketchy scale must not build n x n matrices: the blockwise sum equals the whole-matrix
    formula, and its peak memory stays a fraction of one dense kernel matrix."""
    import tracemalloc

    from sketch2real.metrics import mmd2_unbiased

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3000, 16)), rng.normal(size=(2500, 16)) + 0.2
    kxx, kyy, kxy = (x @ x.T / 16 + 1) ** 3, (y @ y.T / 16 + 1) ** 3, (x @ y.T / 16 + 1) ** 3
    dense = ((kxx.sum() - np.trace(kxx)) / (3000 * 2999) + (kyy.sum() - np.trace(kyy)) / (2500 * 2499) - 2 * kxy.mean())
    del kxx, kyy, kxy
    tracemalloc.start()
    blocked = mmd2_unbiased(x, y, block=200)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert blocked == pytest.approx(dense, rel=1e-12, abs=1e-12)
    assert peak < 3000 * 3000 * 8 / 4, f"peak {peak / 2**20:.1f} MiB: a dense kernel matrix was built"


def test_max_samples_scores_the_same_drawn_samples_on_both_sides(tiny_models, shard_dir, tmp_path):
    """The study's protocol (--max_samples 100: a seeded draw of the reference's samples, and the generated images of
    those samples): a folder holding the test sketches themselves scores FID 0 against the drawn sketches."""
    from sketch2real.metrics import drawn_samples, open_images, shard_set

    sketches = shard_set(str(shard_dir), "test", "sketch")
    folder = tmp_path / "sketches"
    folder.mkdir()
    rows = []
    for i, (image, category, key) in enumerate(zip(open_images(sketches.sources), sketches.categories, sketches.sample_keys)):
        image.save(folder / f"{i:03d}.png")
        rows.append(json.dumps({"key": f"{i:03d}", "image": f"{i:03d}.png", "category": category, "sample_key": key}))
    (folder / "index.jsonl").write_text("\n".join(rows) + "\n")
    common = ["--generated", f"same={folder}", "--reference_shards", shard_dir, "--reference_field", "sketch", "--dims",
              "64", "--no_cache", "--batch_size", "8", "--max_samples", "6"]
    run_script("eval/fid.py", *common, "--metrics", "fid", "clip_accuracy", "--clip_model_name_or_path", tiny_models.clip,
               "--output_dir", tmp_path / "a")
    scores = _fid(tmp_path / "a")
    assert scores["reference"]["n"] == scores["sets"]["same"]["n_generated"] == 6 < len(sketches)
    # CLIP accuracy chooses among every category of the reference, not only among the drawn samples' (the draw's)
    drawn = {c for c, k in zip(sketches.categories, sketches.sample_keys) if k in drawn_samples(sketches, 6, 0)}
    assert scores["clip_accuracy_classes"] == len(set(sketches.categories)) > len(drawn)
    assert abs(scores["sets"]["same"]["fid"]) < 1e-3  # the same six samples on both sides
    assert drawn_samples(sketches, 6, 0) == drawn_samples(sketches, 6, 0) != drawn_samples(sketches, 6, 1)
    proc = run_script("eval/fid.py", *common[:-1], str(len(sketches) + 1), "--output_dir", tmp_path / "b", check=False)
    assert proc.returncode == 2 and "the reference has" in proc.stderr
    # a set without images of some drawn samples is scored on fewer of them: said in one line, not silently
    drawn = drawn_samples(sketches, 6, 0)
    (folder / "index.jsonl").write_text("\n".join(r for r in rows if json.loads(r)["sample_key"] not in sorted(drawn)[:4]) + "\n")
    proc = run_script("eval/fid.py", *common, "--metrics", "fid", "--output_dir", tmp_path / "c")
    assert "same: images of 2 of the 6 drawn samples only (the others were not generated): its scores are of those 2" \
        in proc.stderr and _fid(tmp_path / "c")["sets"]["same"]["n_generated"] == 2


@pytest.fixture(scope="module")
def inception_home(tmp_path_factory) -> str:
    """pytorch-fid's Inception file (random weights) in TORCH_HOME, without building every other tiny model: these
    tests score with Inception alone. Kept for the session, as `tiny_models` keeps its own."""
    from sketch2real.testing.tiny import FID_WEIGHTS_NAME, write_fid_inception_weights

    home = os.environ.get("TORCH_HOME")
    if not (home and (Path(home) / "hub" / "checkpoints" / FID_WEIGHTS_NAME).is_file()):
        home = str(tmp_path_factory.mktemp("torch_home"))
        write_fid_inception_weights(home)
        os.environ["TORCH_HOME"] = home
    return home


def _image_folder(folder: Path, count: int, seed: int, size: tuple[int, int] = (64, 64), alpha: bool = False) -> Path:
    """`count` random PNGs; with `alpha` RGBA whose left half is transparent and black (white once composited on
    white, black under pytorch-fid's convert('RGB'))."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((size[1], size[0], 4 if alpha else 3)) * 255).astype("uint8")
        if alpha:
            pixels[..., 3] = 255
            pixels[:, : size[0] // 2] = 0
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def audit_folders(tmp_path_factory, inception_home) -> Path:
    """A reference folder; two generate.py outputs (images/ beside generate_config.json or index.jsonl); two plain
    folders both named images; a folder with '=' in its name; unreadable, mixed-size and transparent sets."""
    root = tmp_path_factory.mktemp("audit")
    _image_folder(root / "ref", 8, 1)
    for name, seed, marker in (("gen_db", 2, "generate_config.json"), ("gen_ti", 3, "index.jsonl")):
        _image_folder(root / "runs" / name / "images", 6, seed)
        (root / "runs" / name / marker).write_text("{}\n" if marker.endswith(".json") else "".join(
            json.dumps({"key": f"{i:03d}", "image": f"images/{i:03d}.png", "prompt": f"a photo {i}"}) + "\n" for i in range(6)))
    for name in ("a", "b"):
        _image_folder(root / "plain" / name / "images", 4, 4)
    _image_folder(root / "x" / "lr=1e-4", 6, 5)
    (root / "zero").mkdir()
    for i in range(5):
        (root / "zero" / f"{i}.png").write_bytes(b"")
    _image_folder(root / "mixed", 4, 6)
    _image_folder(root / "mixed_extra", 1, 7, size=(48, 32))
    shutil.move(root / "mixed_extra" / "000.png", root / "mixed" / "zz.png")
    _image_folder(root / "rgba", 6, 8, alpha=True)
    return root


def _refused(proc: subprocess.CompletedProcess) -> str:
    """A one-line refusal: exit status 2, no traceback; its message, stderr's last line."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_bare_folders_are_named_by_their_resolved_path_and_same_names_are_refused(audit_folders, tmp_path, monkeypatch):
    from sketch2real.metrics import folder_set

    runs = audit_folders / "runs"
    assert folder_set(str(runs / "gen_db" / "images")).name == "gen_db"  # generate.py's images/: the run's name
    assert folder_set(str(runs / "gen_ti" / "images")).name == "gen_ti"
    monkeypatch.chdir(audit_folders / "plain" / "a" / "images")
    assert folder_set(".").name == "images"  # a plain folder called images keeps its name, never ""
    monkeypatch.chdir(tmp_path)
    plain = [audit_folders / "plain" / name / "images" for name in ("a", "b")]
    line = _refused(run_script("eval/fid.py", "--generated", *plain, "--reference_dir", audit_folders / "ref", "--dims",
                               "64", "--no_cache", "--output_dir", tmp_path / "o", check=False))
    assert "'images'" in line and str(plain[0]) in line and str(plain[1]) in line and "NAME=DIR" in line, line
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_equals_sign_in_a_folder_path_is_part_of_the_folder(audit_folders, tmp_path, monkeypatch):
    folder = audit_folders / "x" / "lr=1e-4"
    run_script("eval/fid.py", "--generated", folder, f"db={folder}", "--reference_dir", audit_folders / "ref", "--dims",
               "64", "--no_cache", "--output_dir", tmp_path / "o")
    sets = _fid(tmp_path / "o")["sets"]
    assert set(sets) == {"lr=1e-4", "db"} and sets["db"]["fid"] == sets["lr=1e-4"]["fid"]
    assert sets["db"]["path"] == sets["lr=1e-4"]["path"] == str(folder)

    from sketch2real.cli import UserError
    from sketch2real.evaluation import parse_generated

    monkeypatch.chdir(audit_folders / "x")
    # a plain name before '=' names the set; where only the whole word is a folder, it is that folder
    assert [parse_generated(word) for word in ("lr=1e-4", "run=lr=1e-4", "./lr=1e-4", "=lr=1e-4")] == [
        (None, "lr=1e-4"), ("run", "lr=1e-4"), (None, "./lr=1e-4"), (None, "=lr=1e-4")]
    with pytest.raises(UserError, match="no folder after '='"):
        parse_generated("db=")  # never the working directory by accident


def test_images_of_different_sizes_are_one_line_whatever_the_workers(audit_folders, tmp_path):
    for workers in (0, 2):
        line = _refused(run_script("eval/fid.py", "--generated", audit_folders / "mixed", "--reference_dir",
                                   audit_folders / "ref", "--dims", "64", "--no_cache", "--num_workers", workers,
                                   "--output_dir", tmp_path / str(workers), check=False))
        assert line == "fid.py: error: images of different sizes in one set ([(3, 32, 48), (3, 64, 64)]...): pass --resize"


def test_a_set_or_reference_with_no_readable_image_stops_before_any_report(audit_folders, tmp_path):
    common = ["--dims", "64", "--no_cache"]
    line = _refused(run_script("eval/fid.py", "--generated", audit_folders / "zero", "--reference_dir",
                               audit_folders / "ref", *common, "--output_dir", tmp_path / "gen", check=False))
    assert "zero" in line and "none of its 5 images could be read" in line, line
    line = _refused(run_script("eval/fid.py", "--generated", audit_folders / "runs" / "gen_db" / "images",
                               "--reference_dir", audit_folders / "zero", *common, "--output_dir", tmp_path / "ref",
                               check=False))
    assert "zero" in line and "none of its 5 images could be read" in line, line
    for out in ("gen", "ref"):
        assert not (tmp_path / out / "metrics.json").exists() and not (tmp_path / out / "report.md").exists()


def test_metrics_and_report_record_what_was_compared(audit_folders, tmp_path):
    runs = audit_folders / "runs"
    run_script("eval/fid.py", "--generated", runs / "gen_db" / "images", runs / "gen_ti" / "images", "--reference_dir",
               audit_folders / "ref", "--dims", "64", "--no_cache", "--output_dir", tmp_path)
    report = _fid(tmp_path)
    assert set(report["sets"]) == {"gen_db", "gen_ti"}
    assert [(d["a"], d["b"]) for d in report["differences"]] == [("gen_db", "gen_ti")]
    assert report["differences"][0]["pairs"] == 0  # plain folders: equal file names are no evidence of a shared item
    assert report["reference"]["path"] == str(audit_folders / "ref")
    text = (tmp_path / "report.md").read_text()
    assert str(audit_folders / "ref") in text
    for name, folder in (("gen_db", runs / "gen_db" / "images"), ("gen_ti", runs / "gen_ti")):  # gen_ti: its index's run
        assert report["sets"][name]["path"] == str(folder)
        assert f"| {name} | `{folder}` |" in text


def test_transparent_images_are_noted_where_pytorch_fid_would_differ(audit_folders, tmp_path):
    run_script("eval/fid.py", "--generated", audit_folders / "rgba", audit_folders / "runs" / "gen_db" / "images",
               "--reference_dir", audit_folders / "ref", "--dims", "64", "--no_cache", "--output_dir", tmp_path / "o")
    report = _fid(tmp_path / "o")
    assert report["transparent_images"] == {"rgba": 6}  # the opaque set and reference are not named
    text = (tmp_path / "o" / "report.md").read_text()
    assert "composited on white" in text and "convert('RGB')" in text and "rgba (6 images)" in text
    run_script("eval/fid.py", "--generated", audit_folders / "runs" / "gen_db" / "images", "--reference_dir",
               audit_folders / "ref", "--dims", "64", "--no_cache", "--output_dir", tmp_path / "opaque")
    assert "transparent_images" not in _fid(tmp_path / "opaque")
    assert "composited on white" not in (tmp_path / "opaque" / "report.md").read_text()


def test_missing_shard_index_names_eval_fids_own_flags(audit_folders, tmp_path):
    (tmp_path / "shards").mkdir()
    base = ["--generated", audit_folders / "rgba", "--output_dir", tmp_path / "o", "--dims", "64", "--no_cache"]
    line = _refused(run_script("eval/fid.py", *base, "--reference_shards", tmp_path / "shards", "--reference_split",
                               "nosuch", check=False))
    assert "nosuch.json" in line and "--reference_split" in line and "--split)" not in line, line
    line = _refused(run_script("eval/fid.py", *base, "--reference_dir", audit_folders / "ref", "--metrics", "sketchiness",
                               "--probe_shards", tmp_path / "shards", "--probe_split", "nosuch", check=False))
    assert "nosuch.json" in line and "--probe_split" in line, line


def test_a_generation_runs_images_folder_scores_as_the_run_and_clip_score_is_never_dropped(audit_folders, tmp_path, tiny_models):
    """RUN/images reads RUN/index.jsonl: the same scores, pairs and prompts as RUN (as a plain folder it had no pairs
    and no prompts, and --metrics clip_score was dropped without a word); a set without prompts gets clip_score null
    with its reason, and a warning."""
    from sketch2real.metrics import folder_set

    run, plain = audit_folders / "runs" / "gen_ti", audit_folders / "runs" / "gen_db" / "images"
    assert folder_set(str(run / "images")).prompts == folder_set(str(run)).prompts == [f"a photo {i}" for i in range(6)]
    proc = run_script("eval/fid.py", "--generated", f"run={run}", f"img={run / 'images'}", f"plain={plain}",
                      "--reference_dir", audit_folders / "ref", "--dims", "64", "--no_cache", "--metrics", "fid", "kid",
                      "clip_score", "--clip_model_name_or_path", tiny_models.clip, "--output_dir", tmp_path)
    report = _fid(tmp_path)
    assert report["sets"]["img"] == report["sets"]["run"] and report["sets"]["run"]["clip_score"] is not None
    same = next(d for d in report["differences"] if {d["a"], d["b"]} == {"run", "img"})
    assert same["pairs"] == 6 and same["kid_difference"] == 0
    assert report["sets"]["plain"]["clip_score"] is None and "no prompt" in report["sets"]["plain"]["clip_score_reason"]
    assert "clip_score: no CLIP score for plain" in proc.stderr
    assert "No CLIP score of plain: its images name no prompt" in (tmp_path / "report.md").read_text()


def test_an_image_lost_from_a_generation_run_is_counted_and_a_hidden_folder_is_not_a_category(audit_folders, tmp_path):
    """An image listed in index.jsonl but gone from disk (a partial rsync) was dropped without a word: n_generated
    fell and no count said why. A notebook's `.ipynb_checkpoints/` in a plain folder was scored as a category."""
    from sketch2real.metrics import folder_set

    run = tmp_path / "run"
    shutil.copytree(audit_folders / "runs" / "gen_ti", run)
    lost = json.loads((run / "index.jsonl").read_text().splitlines()[2])["image"]
    (run / lost).unlink()
    run_script("eval/fid.py", "--generated", run, "--reference_dir", audit_folders / "ref", "--dims", "64", "--no_cache",
               "--metrics", "fid", "--output_dir", tmp_path / "o")
    report = _fid(tmp_path / "o")
    assert report["sets"]["run"]["n_generated"] == 5 and report["sets"]["run"]["unreadable"] == 1  # scored, and lost
    assert report["corrupt_samples"]["keys"] == [f"run:{lost}"]
    plain = tmp_path / "plain"
    _image_folder(plain / "cat", 2, 1)
    _image_folder(plain / "cat" / ".ipynb_checkpoints", 2, 1)
    images = folder_set(str(plain))
    assert len(images) == 2 and set(images.categories) == {"cat"}

def _unfinished_run(root: Path) -> Path:
    """What a killed infer/generate.py leaves: images/<category>/, a rank's index part, mosaics/, no index.jsonl."""
    _image_folder(root / "images" / "cat", 3, 9)
    _image_folder(root / "mosaics", 1, 10)
    (root / "generate_config.json").write_text("{}\n")
    (root / "index.rank000.jsonl").write_text("".join(json.dumps({"key": f"cat/{i:03d}", "image": f"images/cat/{i:03d}.png",
                                                                  "category": "cat"}) + "\n" for i in range(3)))
    return root


def test_an_unfinished_generation_run_is_refused(audit_folders, tmp_path):
    from sketch2real.cli import UserError
    from sketch2real.metrics import folder_set

    run = _unfinished_run(tmp_path / "killed")
    line = _refused(run_script("eval/fid.py", "--generated", run / "images", "--reference_dir", audit_folders / "ref",
                               "--dims", "64", "--no_cache", "--output_dir", tmp_path / "o", check=False))
    assert f"{run}: an unfinished infer/generate.py run (index.rank000.jsonl" in line, line
    assert "rerun the same infer/generate.py command (it resumes)" in line and not (tmp_path / "o" / "metrics.json").exists()
    (run / "index.rank000.jsonl").unlink()
    (run / "PREEMPTED").write_text("generation stopped after 0 of 3 images\n")  # stopped before its first rows
    with pytest.raises(UserError, match=r"unfinished infer/generate\.py run \(PREEMPTED"):
        folder_set(str(run))


def test_too_few_probe_pairs_stop_before_any_feature_is_extracted(folders, shard_dir, tiny_models, tmp_path):
    """The split's 5 pairs are refused up front: no reference features extracted (none cached), not after every
    extractor has run."""
    line = _refused(run_script("eval/fid.py", "--generated", folders / "a", "--reference_shards", shard_dir, "--metrics",
                               "fid", "sketchiness", "--probe_split", "val", "--clip_model_name_or_path", tiny_models.clip,
                               "--dims", "64", "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "o", check=False))
    assert f"sketchiness: only 5 sketch/photo pairs in split 'val' of {shard_dir}; the probe needs at least 10" in line, line
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_the_probe_is_never_fitted_on_the_reference_s_own_split_however_the_folder_is_written(folders, shard_dir,
                                                                                               tiny_models, tmp_path):
    """--probe_shards naming the reference shards with a trailing slash and --probe_split the reference's split was
    taken (the paths were compared as text): one line, before any feature is extracted."""
    line = _refused(run_script("eval/fid.py", "--generated", folders / "a", "--reference_shards", shard_dir,
                               "--reference_split", "test", "--probe_shards", f"{shard_dir}/", "--probe_split", "test",
                               "--metrics", "sketchiness", "--clip_model_name_or_path", tiny_models.clip,
                               "--output_dir", tmp_path / "o", check=False))
    assert "--probe_split test is the reference's own split" in line, line


def test_the_per_category_chart_of_all_of_sketchy_is_an_image_a_viewer_opens(tmp_path):
    """125 categories x 8 sets side by side drew a 60,300 px wide chart; FID above KID, at most 40 inches wide."""
    from sketch2real.evaluation import bar_chart

    categories = [f"category{i}" for i in range(125)]
    report = {"sets": {f"set{j}": {"per_category": {c: {"fid": 1.0 + j, "kid": 0.1} for c in categories}}
                       for j in range(8)}}
    bar_chart(report, tmp_path / "chart.png")
    assert Image.open(tmp_path / "chart.png").size == (4000, 900)
