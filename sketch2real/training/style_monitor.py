"""The style arriving during training: each validation mosaic's sketchiness and content accuracy, the two axes
eval/fid.py scores the final images on, logged to the tracker and `validation_log.jsonl` at every validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sketch2real.extractors import BLANK_SPREAD, Extractor, grey_spread
from sketch2real.metrics import ImageSet, LinearProbe, mean_ci95, proportion_ci95, zero_shot_correct


@dataclass
class StyleMonitor:
    """A CLIP extractor, the sketchiness probe on its features, and the zero-shot classifier of the release's
    categories (the same probe and classifier as eval/fid.py's `sketchiness` and `clip_accuracy`)."""

    clip: Extractor
    probe: LinearProbe
    class_names: list[str]
    class_embeddings: np.ndarray

    def score(self, images: Sequence[Image.Image], categories: Sequence[str | None]) -> dict[str, float]:
        """`validation_sketchiness`: the images' mean probability of being a sketch (0 for a blank canvas, as
        eval/fid.py counts it; `validation_blank_images` where there are some); `validation_content_accuracy`:
        the fraction classified as their own category, over the images whose category is one of the release's
        (absent when none is); each with its 95% interval over the images (`_ci95`)."""
        ids = [str(i) for i in range(len(images))]
        features, _ = self.clip.extract(ImageSet("validation", list(images), ids, [c or "" for c in categories], ids), 0, 1,
                                        False)
        blank = np.array([grey_spread(image) < BLANK_SPREAD for image in images], dtype=bool)
        sketchiness = np.where(blank, 0.0, self.probe.probability(features))
        result = {"validation_sketchiness": float(sketchiness.mean()),
                  "validation_sketchiness_ci95": mean_ci95(sketchiness, bounds=(0.0, 1.0))}
        if blank.any():
            result["validation_blank_images"] = int(blank.sum())
        known = [i for i, c in enumerate(categories) if c in self.class_names]
        if known:
            correct = zero_shot_correct(features[known], [categories[i] for i in known], self.class_embeddings,
                                        self.class_names)
            result["validation_content_accuracy"] = float(correct.mean())
            result["validation_content_accuracy_ci95"] = proportion_ci95(correct)
        return result


_monitors: dict[tuple, StyleMonitor | None] = {}  # one per process and setting (sequential stages share it)


def style_monitor(model_name_or_path: str, shard_dir: str, samples: int, seed: int, accelerator,
                  output_dir: str | Path) -> StyleMonitor | None:
    """The monitor, fitted on the first call: the probe on `samples` paired sketches and photos of the train split
    (every process extracts its part: a collective, so every process calls this), saved as
    `output_dir/sketchiness_probe.npz`. The main process gets the monitor, the others None (they only generate)."""
    from sketch2real.evaluation import sketchiness_probe, zero_shot_classifier
    from sketch2real.extractors import clip_extractor
    from sketch2real.metrics import shard_set
    from sketch2real.training.accelerator import zero3_init_disabled

    key = (model_name_or_path, str(shard_dir), samples, seed)
    if key not in _monitors:
        with zero3_init_disabled(accelerator):  # a frozen scorer outside DeepSpeed: whole on every process
            clip = clip_extractor(model_name_or_path, accelerator.device, 16, 0)
        probe, _ = sketchiness_probe(shard_dir, "train", samples, seed, clip, accelerator.state, None, output_dir)
        if probe is None:
            _monitors[key] = None
        else:
            class_names = sorted(set(shard_set(shard_dir, "train", "sketch").categories) - {None, ""})
            _monitors[key] = StyleMonitor(clip, probe, class_names, zero_shot_classifier(clip, class_names))
    return _monitors[key]
