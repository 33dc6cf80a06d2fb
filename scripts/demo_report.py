"""The demo's closing report: each effect with its 95% interval and a plain verdict -> OUT/report.md.

Usage: python scripts/demo_report.py OUT   (the folder scripts/demo.sh wrote)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sketch2real.metrics import verdict


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


DIFFERENCES = {"kid": "differences", "sketchiness": "style_differences"}  # each measure's table in metrics.json


def _difference(metrics: dict, trained: str, base: str, measure: str = "kid") -> tuple[float, list[float], str]:
    """measure(trained) - measure(base) (KID, or sketchiness over the items both show), its interval and its job's
    verdict (Holm's over the job's table), whichever order the job listed the pair in."""
    for d in metrics[DIFFERENCES[measure]]:
        if {d["a"], d["b"]} == {trained, base}:
            sign = 1 if d["a"] == trained else -1
            low, high = sorted(sign * v for v in d[f"{measure}_difference_ci95"])
            return sign * d[f"{measure}_difference"], [low, high], d["verdict"]
    raise SystemExit(f"no {trained} vs {base} {measure} comparison in the metrics")


def _cell(row: dict, key: str) -> str:
    """`value [low, high]`, or the value alone where no interval is honest (CSD against few reference images)."""
    interval = row.get(f"{key}_ci95")
    given = interval and interval[0] is not None and interval[0] == interval[0]  # not null or nan: one to be had
    return f"{row[key]:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if given else f"{row[key]:.3f}"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo")
    lines = ["# What the demo shows", "",
             "Each effect with a 95% confidence interval; 'significant' when the interval excludes 0, except KID "
             "and sketchiness differences: their evaluation job's verdict, Holm's over all the pairs of sets it compared "
             "(a 5% chance of any false 'significant' among them).", ""]
    pretrain = _load(out / "tiny_models" / "tiny-sd-trained" / "pretrain.json")
    lines += [f"Base model: the tiny SD trained here on a synthetic Sketchy ({pretrain['training_images']} images, "
              f"{pretrain['seconds']:.0f} s): held-out denoising loss {pretrain['heldout_denoising_loss']:.4f} "
              f"(random weights: {pretrain['random_base_heldout_denoising_loss']:.4f}), reconstruction L1 "
              f"{pretrain['heldout_reconstruction_l1']:.3f}.", "",
              "| effect | measure | value [95% CI] | verdict |", "|---|---|---:|---|"]

    controlnet = _load(out / "controlnet" / "metrics.json")
    if "conditioning_gain" in controlnet:
        gain, (low, high) = controlnet["conditioning_gain"], controlnet["conditioning_gain_ci95"]
        lines.append(f"| ControlNet uses its sketch | held-out denoising loss with a sketch of another photo of the category "
                     f"− with its own sketch | {gain:+.5f} [{low:+.5f}, {high:+.5f}] | {verdict([low, high])} |")
    photos = _load(out / "eval_photos" / "metrics.json")["sets"]["controlnet"]
    gain, (low, high) = photos["pixel_pairing_gain"], photos["pixel_pairing_gain_ci95"]
    lines.append(f"| ControlNet follows its sketch | pixel pairing gain: similarity to its own photo − to another photo "
                 f"of its category (grey 16x16 thumbnails of the generated images) | {gain:+.4f} [{low:+.4f}, {high:+.4f}] | {verdict([low, high])} |")
    for name, folder, what in (("dreambooth", "eval_dreambooth", "DreamBooth 'a cat in the style of sks' vs base 'a cat'"),
                               ("textual_inversion", "eval_textual_inversion",
                                "Textual Inversion 'a {category} in the style of <sketch>' vs base 'a {category}'")):
        value, (low, high), says = _difference(_load(out / folder / "metrics.json"), name, "base")
        lines.append(f"| {what}: closer to the test sketches | KID(trained) − KID(base) (< 0: closer) "
                     f"| {value:+.3f} [{low:+.3f}, {high:+.3f}] | {says} |")
    style_metrics = _load(out / "eval_textual_inversion" / "metrics.json")
    for name, reference, what in (
            ("style_lora", "base", "style LoRA (DoRA, EMA, every category) 'a {category} in the style of sks' vs base "
                                   "'a {category}': closer to the test sketches"),
            ("style_lora_without_ema", "base", "the same LoRA without its EMA vs base: closer to the test sketches"),
            ("style_lora", "style_lora_without_ema", "the style LoRA's EMA vs its trained weights: closer to the test "
                                                     "sketches"),
            ("style_lora", "textual_inversion", "the style LoRA vs Textual Inversion: closer to the test sketches")):
        value, (low, high), says = _difference(style_metrics, name, reference)
        lines.append(f"| {what} | KID({name}) − KID({reference}) (< 0: closer) | {value:+.3f} [{low:+.3f}, {high:+.3f}] "
                     f"| {says} |")
    for name, folder, what in (("dreambooth", "eval_dreambooth", "DreamBooth 'a cat in the style of sks' vs base 'a cat'"),
                               ("textual_inversion", "eval_textual_inversion", "Textual Inversion vs base"),
                               ("style_lora", "eval_textual_inversion", "style LoRA (EMA) vs base")):
        value, (low, high), says = _difference(_load(out / folder / "metrics.json"), name, "base", "sketchiness")
        lines.append(f"| {what}: more sketch-like | sketchiness(trained) − sketchiness(base), paired over the items "
                     f"| {value:+.3f} [{low:+.3f}, {high:+.3f}] | {says} |")
    sequential = _load(out / "dreambooth_sequential" / "sequential_report.json")
    for category, value in sequential["forgetting"].items():
        low, high = sequential["forgetting_ci95"][category]
        lines.append(f"| Sequential DreamBooth forgets {category} | held-out loss at the end − right after its stage "
                     f"| {value:+.4f} [{low:+.4f}, {high:+.4f}] | {verdict([low, high])} |")
    lines += ["", "## Style and content (against the test sketches; 95% intervals over the images)", "",
              "Sketchiness: a linear probe's mean probability that an image is a sketch (fitted on the train split's "
              "sketches and photos); CSD: style similarity to the test sketches (CSD's style head); content: the share "
              "the zero-shot CLIP classifier gives its own category. The demo's CLIP and CSD are tiny models with random "
              "weights: their columns are chance for every set and say nothing here; with real weights (eval/fid.py's "
              "defaults) they say whether the style arrived and the content was kept.", "",
              "| generated set | sketchiness [95% CI] | CSD style [95% CI] | content kept: CLIP accuracy [95% CI] |",
              "|---|---:|---:|---:|"]
    cat_metrics = _load(out / "eval_dreambooth" / "metrics.json")  # DreamBooth is a cat run: against the cat sketches
    for label, metrics, name in (("base", style_metrics, "base"), ("textual_inversion", style_metrics, "textual_inversion"),
                                 ("style_lora", style_metrics, "style_lora"),
                                 ("style_lora_without_ema", style_metrics, "style_lora_without_ema"),
                                 ("base, cat only", cat_metrics, "base"), ("dreambooth (cat)", cat_metrics, "dreambooth")):
        row = metrics["sets"][name]
        cells = [_cell(row, k) for k in ("sketchiness", "csd", "clip_accuracy")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text, end="")
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
