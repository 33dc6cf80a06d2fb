"""Style measured: the sketchiness probe, CSD style similarity, content kept beside them, the style-content chart and
verdicts, on tiny models and the synthetic Sketchy (grey strokes on white vs coloured shapes on tinted backgrounds)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import launch, run_script


@pytest.fixture(scope="module")
def tiny_csd(tmp_path_factory):
    from sketch2real.testing.tiny import build_tiny_csd

    return build_tiny_csd(tmp_path_factory.mktemp("tiny-csd"))


@pytest.fixture(scope="module")
def test_folders(shard_dir, tmp_path_factory):
    """The test split's photos and its sketches as generated folders (index.jsonl with categories)."""
    from sketch2real.metrics import open_images, shard_set

    root = tmp_path_factory.mktemp("style-sets")
    for field in ("photo", "sketch"):
        images = shard_set(str(shard_dir), "test", field)
        folder = root / field
        folder.mkdir()
        rows = []
        for i, (image, category) in enumerate(zip(open_images(images.sources), images.categories)):
            image.save(folder / f"{i:03d}.png")
            rows.append(json.dumps({"key": f"{i:03d}", "image": f"{i:03d}.png", "category": category,
                                    "prompt": f"a {category}"}))
        (folder / "index.jsonl").write_text("\n".join(rows) + "\n")
    blank = root / "blank"  # a model collapsed to white canvases, of the sketches' categories
    shutil.copytree(root / "sketch", blank)
    for file in blank.glob("*.png"):
        Image.new("RGB", Image.open(file).size, "white").save(file)
    (blank / "999.png").write_bytes(b"not an image")  # unreadable: not scored, so not counted among the images scored
    with open(blank / "index.jsonl", "a") as index:
        index.write(json.dumps({"key": "999", "image": "999.png", "category": "cat", "prompt": "a cat"}) + "\n")
    return root


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_style_metrics_end_to_end(tiny_models, tiny_csd, shard_dir, test_folders, tmp_path):
    """Reference: the val sketches; generated: the test photos and the test sketches. The probe (fitted on the train
    split's pairs) must call the sketches sketches and the photos photos; CSD must put the sketches nearer the
    sketch prototype; every number is where metrics.json promises it, the chart has a point per set and the
    reference, the probe is cached, and the reported CSD and sketchiness equal a computation by hand."""
    from accelerate import PartialState

    from sketch2real.evaluation import features_of
    from sketch2real.extractors import clip_extractor, csd_extractor
    from sketch2real.metrics import LinearProbe, folder_set, shard_set

    args = ["--generated", f"photos={test_folders / 'photo'}", f"sketches={test_folders / 'sketch'}",
            f"blank={test_folders / 'blank'}", "--reference_shards",
            shard_dir, "--reference_split", "val", "--reference_field", "sketch", "--metrics", "sketchiness", "csd",
            "--clip_model_name_or_path", tiny_models.clip, "--csd_model_name_or_path", tiny_csd, "--cache_dir",
            tmp_path / "cache", "--batch_size", "8", "--num_workers", "0"]
    proc = run_script("eval/fid.py", *args, "--output_dir", tmp_path / "one")
    report = _metrics(tmp_path / "one")
    photos, sketches = report["sets"]["photos"], report["sets"]["sketches"]

    # style: the probe separates the synthetic sketches from the photos, with room to spare
    probe = report["sketchiness_probe"]
    assert probe["heldout_accuracy"] >= 0.9 and probe["n_heldout"] >= 6 and probe["n_train"] >= 20, probe
    assert probe["split"] == "train" and probe["features"] == "clip" and probe["cache_hit"] is False
    assert sketches["sketchiness"] - photos["sketchiness"] > 0.5, (sketches["sketchiness"], photos["sketchiness"])
    assert photos["sketchiness_ci95"][1] < sketches["sketchiness_ci95"][0]
    assert sketches["csd"] > photos["csd"]
    assert report["style_content"]["sketches"]["style"] == "yes"
    assert report["style_content"]["photos"]["style"] == "no (photo-like)"
    # white canvases are no sketches, whatever the probe says of them (it scored them above the sketches)
    blank = report["sets"]["blank"]
    assert blank["blank_images"] == blank["n_generated"] == len(list((test_folders / "blank").glob("*.png"))) - 1 > 0
    assert blank["sketchiness"] == 0.0
    assert report["style_content"]["blank"]["style"] == "no (photo-like)"
    assert f"({blank['n_generated']} blank images, counted as not sketches)" in report["style_content"]["blank"]["answer"]
    assert "blank_images" not in sketches or sketches["blank_images"] == 0
    # and whether one set moved the style against another: paired over the items both show (the same keys)
    moved = {(d["a"], d["b"]): d for d in report["style_differences"]}
    assert set(moved) == {("photos", "sketches"), ("photos", "blank"), ("sketches", "blank")}
    photos_sketches = moved[("photos", "sketches")]
    assert photos_sketches["pairs"] == photos["n_generated"] == sketches["n_generated"]
    assert photos_sketches["sketchiness_difference"] == pytest.approx(photos["sketchiness"] - sketches["sketchiness"])
    assert photos_sketches["sketchiness_difference_ci95"][1] < 0 and photos_sketches["verdict"] == "significant"
    assert moved[("sketches", "blank")]["sketchiness_difference"] == pytest.approx(sketches["sketchiness"])

    # metrics.json schema: value and interval per set, per category, and for the reference (the chart's anchor)
    for result in (photos, sketches, report["reference"]):
        for key in ("sketchiness", "csd", "clip_accuracy"):
            if key == "csd" and result["csd_ci95"] is None:  # a reference of a few tiny-model embeddings
                assert "no honest interval" in result["csd_ci95_reason"]
                continue
            low, high = result[f"{key}_ci95"]
            assert low <= result[key] <= high, (key, result[key], low, high)
    categories = set(shard_set(str(shard_dir), "val", "sketch").categories) & set(folder_set(str(test_folders / "photo")).categories)
    assert categories and set(photos["per_category"]) == categories
    for values in photos["per_category"].values():
        assert {"sketchiness", "sketchiness_ci95", "csd", "csd_ci95", "clip_accuracy", "clip_accuracy_ci95"} <= set(values)
    assert set(report["style_content"]) == {"photos", "sketches", "blank"}
    assert all({"style", "content", "answer"} <= set(v) for v in report["style_content"].values())
    assert "clip_accuracy" in report["metrics"]  # content kept comes with style

    # the chart: both panels, a point for the reference and each set
    chart = tmp_path / "one" / "style_content.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    points = report["style_content_chart"]
    assert len(points) == 2 * 4 and {p["panel"] for p in points} == {"sketchiness", "csd"}
    assert sorted(p["name"] for p in points if p["panel"] == "csd") == sorted(["photos", "sketches", "blank",
                                                                               "reference: val sketches"])
    text = (tmp_path / "one" / "report.md").read_text()
    assert "did it learn the sketch style, and keep the content?" in text and "style_content.png" in text
    assert f"| photos | sketches | {photos_sketches['sketchiness_difference']:.3f} [" in text
    assert "learned the sketch style" in proc.stdout
    assert f"sketchiness(photos) - sketchiness(sketches): {photos_sketches['sketchiness_difference']:+.3f} [" in proc.stdout

    # the numbers by hand: CSD = mean(g) . mean(r) / |E r| (or the plain mean cosine to the prototype, see below);
    # sketchiness = mean probability of the saved probe on CLIP features
    state = PartialState()
    reference = shard_set(str(shard_dir), "val", "sketch")
    sets = {name: folder_set(str(test_folders / field)) for name, field in (("photos", "photo"), ("sketches", "sketch"))}
    csd = csd_extractor(str(tiny_csd), state.device, 8, 0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    of_reference_csd = unit(features_of(reference, csd, state, None)[0])
    prototype = unit(of_reference_csd.mean(0))
    m, total = len(of_reference_csd), of_reference_csd.sum(0)
    direction_length = np.sqrt((total @ total - m) / (m * (m - 1)))  # |E r| from distinct pairs
    clip = clip_extractor(str(tiny_models.clip), state.device, 8, 0)
    saved = LinearProbe.load(tmp_path / "one" / "sketchiness_probe.npz")
    # the reference's sketches: 3 of each photo, whose sketchiness interval counts a photo once (clustered)
    from sketch2real.metrics import mean_ci95
    from sketch2real.sketchy import photo_key

    of_reference = saved.probability(features_of(reference, clip, state, None)[0])
    photos_of = [photo_key(key) for key in reference.sample_keys]
    assert len(set(photos_of)) < len(photos_of)
    assert report["reference"]["sketchiness_ci95"] == pytest.approx(mean_ci95(of_reference, photos_of, (0.0, 1.0)))
    assert report["reference"]["sketchiness_ci95"] != pytest.approx(mean_ci95(of_reference, None, (0.0, 1.0)))
    for name, images in sets.items():
        style = features_of(images, csd, state, None)[0]
        # with an interval, E g · E r / |E r| (unbiased by the prototype's noise); without, the plain mean cosine
        by_hand = (unit(style).mean(0) @ total / m / direction_length if report["sets"][name]["csd_ci95"]
                   else np.mean(unit(style) @ prototype))
        assert report["sets"][name]["csd"] == pytest.approx(float(by_hand), abs=1e-6)
        assert report["sets"][name]["sketchiness"] == pytest.approx(
            float(saved.probability(features_of(images, clip, state, None)[0]).mean()), abs=1e-6)

    # 2 processes (probe images extracted data-parallel, gathered in order) give the same numbers
    two_args = [a if a != tmp_path / "cache" else tmp_path / "cache-two" for a in args]
    launch("eval/fid.py", *two_args, "--output_dir", tmp_path / "two")
    two = _metrics(tmp_path / "two")
    assert two["sketchiness_probe"]["cache_hit"] is False
    for name in ("photos", "sketches"):
        for key in ("sketchiness", "csd", "clip_accuracy"):
            assert two["sets"][name][key] == pytest.approx(report["sets"][name][key], abs=1e-6), (name, key)

    # fitted once: another run reads the probe from the cache and gives the same numbers
    run_script("eval/fid.py", *args, "--output_dir", tmp_path / "again")
    again = _metrics(tmp_path / "again")
    assert again["sketchiness_probe"]["cache_hit"] is True
    assert again["sets"]["photos"]["sketchiness"] == photos["sketchiness"]
    assert len(list((tmp_path / "cache").glob("probe-*.npz"))) == 1


def test_prototype_similarity_is_cosine_to_the_normalised_mean():
    from sketch2real.metrics import csd_estimate, prototype_similarity, style_prototype

    reference = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    by_hand = np.array([1.0, 0.0]) + np.array([0.0, 1.0]) + np.array([1.0, 1.0]) / np.sqrt(2)
    by_hand /= np.linalg.norm(by_hand)
    assert style_prototype(reference) == pytest.approx(by_hand)
    generated = np.array([[2.0, 0.0], [0.0, -5.0]])
    assert prototype_similarity(generated, reference) == pytest.approx([by_hand[0], -by_hand[1]])
    rng = np.random.default_rng(0)
    near, far = rng.normal([5, 0], 1, (50, 2)), rng.normal([0, 5], 1, (50, 2))
    low, high = csd_estimate(near, near)["csd_ci95"]
    assert low <= prototype_similarity(near, near).mean() + 1e-3 and high > low
    assert csd_estimate(far, near)["csd_ci95"][1] < low  # another style: clearly lower, intervals apart


def _open_clip_twin(state: dict) -> torch.nn.Module:
    """The tiny CSD's backbone as open_clip builds OpenAI's vision transformer: an independent implementation."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    twin = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16,
                             act_layer=QuickGELU)
    twin.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}, strict=False)
    twin.proj = None  # CSD drops CLIP's projection and applies its style head instead
    return twin.eval()


def test_csd_loads_the_released_layout_and_matches_an_independent_implementation(tiny_csd, tmp_path):
    """Our CSD (transformers' CLIP vision model + style head, converted from OpenAI's key layout) gives the style
    embeddings open_clip's OpenAI-layout transformer gives with the same weights; the released checkpoint's format (a
    torch file, `module.` prefixes, weights nested under model_state_dict beside numpy scalars) loads with
    weights_only=True, and a file that would import code on load is refused in one line."""
    import argparse

    from safetensors.torch import load_file

    from sketch2real.cli import UserError
    from sketch2real.extractors import load_csd

    state = load_file(str(tiny_csd / "model.safetensors"))
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(_open_clip_twin(state)(pixels) @ state["last_layer_style"], dim=-1)
        model, side = load_csd(str(tiny_csd))
        assert side == 32
        assert torch.allclose(model(pixels), expected, atol=1e-5), (model(pixels) - expected).abs().max()
        released = tmp_path / "released"
        released.mkdir()
        (released / "config.json").write_text((tiny_csd / "config.json").read_text())
        torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": np.int64(7),
                    "best_score": np.float64(0.5)}, released / "pytorch_model.bin")
        assert torch.allclose(load_csd(str(released))[0](pixels), expected, atol=1e-5)
        assert torch.allclose(load_csd(str(released / "pytorch_model.bin"))[0](pixels), expected, atol=1e-5)
    planted = tmp_path / "planted"
    planted.mkdir()
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=1)}, planted / "checkpoint.pth")  # imports code
    with pytest.raises(UserError, match="cannot load a CSD model"):
        load_csd(str(planted))
    with pytest.raises(UserError, match="no CSD weights"):
        load_csd(str(tmp_path))


def test_the_default_csd_id_loads_offline_from_the_hub_cache(tiny_models, monkeypatch):
    """`--metrics csd` without `--csd_model_name_or_path` on a compute node (HF_HUB_OFFLINE=1, the cache filled on a
    login node) loads the default id from the cache, as the DINOv2 and CLIP defaults load (listing the repo's files
    needed the network: a traceback); an id the cache lacks is one line."""
    from huggingface_hub import constants

    from sketch2real.cli import UserError
    from sketch2real.extractors import DEFAULT_CSD, load_csd

    from .helpers import hub_cache_of_defaults

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache_of_defaults(tiny_models)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_csd(DEFAULT_CSD)[0](pixels), load_csd(str(tiny_models.csd))[0](pixels))
    with pytest.raises(UserError, match="someone/csd is not in the hub cache and HF_HUB_OFFLINE=1"):
        load_csd("someone/csd")


def test_linear_probe_solves_its_penalised_problem_and_separates():
    from sketch2real.metrics import fit_linear_probe

    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0.5, 1.0, (200, 8)), rng.normal(-0.5, 1.0, (200, 8))] * rng.uniform(0.1, 10, 8)
    y = np.r_[np.ones(200), np.zeros(200)]
    probe = fit_linear_probe(x, y, l2=1e-2)
    design = (x - probe.mean) / probe.scale
    p = probe.probability(x)
    assert np.abs(design.T @ (p - y) / len(y) + 1e-2 * probe.weights).max() < 1e-8  # the optimum: gradient 0
    assert abs(np.mean(p - y)) < 1e-8  # unpenalised bias: probabilities average to the base rate
    assert np.mean((p > 0.5) == (y == 1)) > 0.85
    separable = fit_linear_probe(np.r_[np.full((5, 2), 1.0), np.full((5, 2), -1.0)], np.r_[np.ones(5), np.zeros(5)])
    assert np.all(np.isfinite(separable.weights)) and separable.probability(np.array([[1.0, 1.0]]))[0] > 0.9


@pytest.mark.parametrize("sketchiness, accuracy, style, content", [
    ([0.7, 0.9], [0.5, 0.8], "yes", "yes (above chance)"),
    ([0.1, 0.3], [0.5, 0.8], "no (photo-like)", "yes (above chance)"),
    ([0.4, 0.6], [0.1, 0.3], "undecided (interval spans 0.5)", "not shown (interval includes chance, 0.20)"),
    ([0.7, 0.9], [0.0, 0.1], "yes", "no (below chance)"),
])
def test_style_content_verdicts_only_where_the_intervals_allow(sketchiness, accuracy, style, content):
    from sketch2real.evaluation import style_content_verdict

    result = style_content_verdict({"sketchiness_ci95": sketchiness, "clip_accuracy_ci95": accuracy}, num_classes=5)
    assert (result["style"], result["content"]) == (style, content)
    assert ("more images" in result["answer"]) == ("undecided" in style or "not shown" in content)


def test_sketchiness_needs_paired_shards(test_folders, tmp_path):
    proc = run_script("eval/fid.py", "--generated", test_folders / "photo", "--reference_dir", test_folders / "sketch",
                      "--metrics", "sketchiness", "--output_dir", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--probe_shards" in proc.stderr.strip().splitlines()[-1], proc.stderr[-800:]


def test_validation_logs_the_style_arriving(tiny_models, shard_dir, tmp_path):
    """`--validation_clip_model_name_or_path`: every validation logs its images' sketchiness and content accuracy
    (to `validation_log.jsonl`, the tracker and metrics.json), and the values are those of the saved probe and the
    zero-shot classifier applied by hand to the cells of that step's mosaic."""
    from accelerate import PartialState

    from sketch2real.evaluation import zero_shot_classifier
    from sketch2real.extractors import clip_extractor
    from sketch2real.metrics import ImageSet, LinearProbe, shard_set, zero_shot_correct

    out, resolution, per_prompt = tmp_path / "db", 32, 2
    prompts = ["a sks sketch of a cat", "a photo of a cat"]
    run_script("train/dreambooth.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
               "--instance_category", "cat", "--instance_prompt", prompts[0], "--resolution", str(resolution),
               "--max_train_steps", "4", "--validation_steps", "2", "--validation_prompt", *prompts,
               "--num_validation_images", str(per_prompt), "--validation_inference_steps", "2", "--num_heldout_samples",
               "0", "--validation_clip_model_name_or_path", tiny_models.clip, "--checkpointing_steps", "0",
               "--report_to", "none", "--output_dir", out)
    log = [json.loads(line) for line in (out / "validation_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4]
    metrics = _metrics(out)
    assert metrics["validation_sketchiness"] == log[-1]["validation_sketchiness"]
    assert metrics["validation_content_accuracy"] == log[-1]["validation_content_accuracy"]

    mosaic = Image.open(out / "validation" / "step-000004.png").convert("RGB")
    cells = [mosaic.crop((x * resolution, y * resolution, (x + 1) * resolution, (y + 1) * resolution))
             for y in range(len(prompts)) for x in range(per_prompt)]
    ids = [str(i) for i in range(len(cells))]
    clip = clip_extractor(str(tiny_models.clip), PartialState(cpu=True).device, 8, 0)
    features, valid = clip.extract(ImageSet("cells", cells, ids, ["cat"] * len(cells), ids), 0, 1, False)
    assert valid.all()
    probe = LinearProbe.load(out / "sketchiness_probe.npz")
    from sketch2real.extractors import BLANK_SPREAD, grey_spread

    assert all(grey_spread(cell) >= BLANK_SPREAD for cell in cells)  # no blank canvas among them: the probe's alone
    by_hand = probe.probability(features)
    assert len(set(by_hand.tolist())) == len(cells)  # the cells differ: the mean of all of them is what is checked
    # relative: an untrained model's images sit far from the sketches (probabilities ~1e-20)
    assert log[-1]["validation_sketchiness"] == pytest.approx(float(by_hand.mean()), rel=1e-5, abs=0)
    names = sorted(set(shard_set(str(shard_dir), "train", "sketch").categories))
    correct = zero_shot_correct(features, ["cat"] * len(cells), zero_shot_classifier(clip, names), names)
    assert log[-1]["validation_content_accuracy"] == pytest.approx(float(correct.mean()), abs=1e-9)


def test_clip_accuracy_scores_the_images_that_name_a_category_and_none_of_a_flat_folder():
    """Content kept is scored over the images whose category is a class: a flat folder (no categories) has no
    accuracy and says why (it scored 0, "lost the content"); an image without one is left out, not counted wrong."""
    from sketch2real.evaluation import extra_scores

    classes = np.eye(2)  # cat, dog
    clip = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # a cat, a dog, a dog
    flat = extra_scores({"clip_accuracy"}, {"clip": clip}, {}, np.array(["", "", ""], dtype=object), classes,
                        ["cat", "dog"], 0, 10)
    assert flat["clip_accuracy"] is None and "none of its images names a category" in flat["clip_accuracy_reason"]
    some = extra_scores({"clip_accuracy"}, {"clip": clip}, {}, np.array(["cat", "", "dog"], dtype=object), classes,
                        ["cat", "dog"], 0, 10)
    assert some["clip_accuracy"] == 1.0 and "clip_accuracy_reason" not in some


def test_clip_score_reads_the_images_that_name_a_prompt_and_a_prompt_s_images_are_independent(tmp_path, monkeypatch):
    """infer/generate.py writes "" as the prompt of an unconditional image (a captioner's empty caption): CLIP score
    scores the images that name one (none would be "its images name no prompt"; all, against the empty prompt, a
    number where there is none). The several images of one `--prompts` prompt (`<key>/<i>`, each its own seed) are
    independent draws given the prompt: clustered together, one prompt's images had no sketchiness interval at all;
    images of one Sketchy photo are one cluster."""
    import sketch2real.evaluation as evaluation
    from sketch2real.metrics import folder_set

    rows = []
    for i, (key, prompt, extra) in enumerate([("p0/0", "a cat", {"image_index": 0}), ("p0/1", "a cat", {"image_index": 1}),
                                              ("p1", "", {}), ("s0", "a dog", {"sample_key": "dog/n1-2"})]):
        Image.new("RGB", (8, 8), "white").save(tmp_path / f"{i}.png")
        rows.append({"key": key, "image": f"{i}.png", "category": "cat", "prompt": prompt, **extra})
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = folder_set(str(tmp_path))
    clusters = evaluation.photo_clusters(images)
    assert list(clusters) == ["#0", "#1", "#2", "dog/n1"]
    assert not np.isnan(evaluation.mean_ci95([0.9, 0.8], clusters[:2])).any()
    scored = []
    monkeypatch.setattr(evaluation, "clip_scores", lambda sources, prompts, *rest: scored.append(prompts) or np.ones(2))
    opts = evaluation.EvalOptions(generated=[str(tmp_path)], reference_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                                  metrics=["clip_score"], clip_model_name_or_path="unused", num_workers=0)
    from accelerate import PartialState

    report = evaluation.run_fid(opts, [images], folder_set(str(tmp_path)), PartialState())
    assert scored == [["a cat", "a cat", "a dog"]] and report["sets"][images.name]["clip_score"] is not None


def test_an_interval_that_cannot_be_had_is_no_interval_in_the_report():
    """One image gives a mean no interval ([nan, nan] in the arrays, null in metrics.json): report.md printed
    "0.50 [nan, nan]"."""
    from sketch2real.evaluation import _interval
    from sketch2real.metrics import mean_ci95

    assert _interval(0.5, mean_ci95([0.5])) == "0.50" and _interval(0.5, None) == "0.50"
    assert _interval(0.5, [0.25, 0.75]) == "0.50 [0.25, 0.75]"


def test_validation_counts_a_blank_canvas_as_no_sketch_as_eval_does():
    """The training-time monitor reads sketchiness as eval/fid.py does: a blank validation image is no sketch, whatever
    the probe says (a probe that calls everything a sketch here), and the count is logged."""
    from sketch2real.extractors import Extractor
    from sketch2real.metrics import LinearProbe
    from sketch2real.training.style_monitor import StyleMonitor

    features = lambda images, rank, world, progress: (np.ones((len(images), 2)), np.ones(len(images), bool))  # noqa: E731
    sure = LinearProbe(mean=np.zeros(2), scale=np.ones(2), weights=np.ones(2), bias=10.0)  # P(sketch) ~ 1
    monitor = StyleMonitor(Extractor("clip", {}, features), sure, ["cat"], np.eye(2)[:1])
    strokes = Image.new("RGB", (32, 32), "white")
    strokes.paste((0, 0, 0), (4, 4, 28, 8))
    scored = monitor.score([Image.new("RGB", (32, 32), "white"), strokes], ["cat", "cat"])
    assert scored["validation_blank_images"] == 1
    assert scored["validation_sketchiness"] == pytest.approx(float(sure.probability(np.ones((1, 2)))[0]) / 2)
    assert 0.0 <= scored["validation_sketchiness_ci95"][0] and scored["validation_sketchiness_ci95"][1] <= 1.0
