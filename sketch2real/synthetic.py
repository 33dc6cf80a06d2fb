"""A synthetic Sketchy release in the layout of the real one as its archives extract (`256x256/`, `README.txt`,
`info/`; the un-augmented tx_000000000000 renderings only), for tests and the demo.

Each category is a distinct coloured shape; a photo draws it filled, in a seeded
pose (position, scale, rotation, mirror), on a textured background; each of its
sketches is a wobbly black outline of the same shape in the same pose, so that
sketch -> photo pairing, category and style are all learnable and measurable.
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sketch2real.sketchy import DEFAULT_AUGMENTATION, RENDERED, category_words

DEFAULT_CATEGORIES = ("airplane", "apple", "car_(sedan)", "cat", "hot-air_balloon")

Polygon = list[tuple[float, float]]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> Polygon:
    return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Parts in a unit square centred on (0, 0): (polygon, RGB colour).
_SHAPES: dict[str, list[tuple[Polygon, tuple[int, int, int]]]] = {
    "cat": [
        (_ellipse(0.05, 0.15, 0.32, 0.22), (230, 140, 40)),
        (_ellipse(-0.25, -0.15, 0.17, 0.16), (230, 140, 40)),
        ([(-0.38, -0.22), (-0.34, -0.42), (-0.25, -0.28)], (200, 110, 30)),
        ([(-0.2, -0.3), (-0.12, -0.45), (-0.08, -0.22)], (200, 110, 30)),
        ([(0.35, 0.1), (0.48, -0.2), (0.4, 0.12)], (200, 110, 30)),
    ],
    "car_(sedan)": [
        (_rect(-0.45, 0.0, 0.45, 0.2), (200, 30, 40)),
        ([(-0.25, 0.0), (-0.12, -0.18), (0.18, -0.18), (0.3, 0.0)], (160, 20, 30)),
        (_ellipse(-0.25, 0.22, 0.1, 0.1), (30, 30, 30)),
        (_ellipse(0.25, 0.22, 0.1, 0.1), (30, 30, 30)),
    ],
    "hot-air_balloon": [
        (_ellipse(0.0, -0.15, 0.3, 0.33), (150, 60, 200)),
        ([(-0.18, 0.1), (-0.07, 0.3), (0.07, 0.3), (0.18, 0.1)], (190, 120, 230)),
        (_rect(-0.08, 0.3, 0.08, 0.42), (120, 80, 40)),
    ],
    "airplane": [
        (_ellipse(0.0, 0.0, 0.45, 0.08), (170, 175, 185)),
        ([(-0.08, 0.0), (0.12, -0.38), (0.2, -0.38), (0.12, 0.0)], (120, 125, 140)),
        ([(-0.08, 0.0), (0.12, 0.38), (0.2, 0.38), (0.12, 0.0)], (120, 125, 140)),
        ([(-0.45, 0.0), (-0.42, -0.2), (-0.34, -0.2), (-0.32, 0.0)], (120, 125, 140)),
    ],
    "apple": [
        (_ellipse(0.0, 0.08, 0.3, 0.28), (60, 180, 50)),
        (_rect(-0.02, -0.32, 0.03, -0.16), (90, 60, 30)),
        (_ellipse(0.1, -0.28, 0.1, 0.05), (30, 130, 30)),
    ],
    "dog": [
        (_ellipse(0.05, 0.05, 0.3, 0.15), (140, 90, 50)),
        (_ellipse(-0.3, -0.15, 0.12, 0.11), (140, 90, 50)),
        (_rect(-0.18, 0.12, -0.1, 0.38), (120, 75, 40)),
        (_rect(0.18, 0.12, 0.26, 0.38), (120, 75, 40)),
        (_ellipse(-0.38, -0.05, 0.05, 0.1), (90, 60, 30)),
    ],
    "helicopter": [
        (_ellipse(-0.1, 0.05, 0.22, 0.15), (240, 200, 30)),
        (_rect(0.1, 0.0, 0.45, 0.06), (220, 180, 20)),
        (_rect(-0.45, -0.16, 0.25, -0.13), (50, 50, 50)),
        (_rect(-0.2, 0.22, 0.05, 0.25), (50, 50, 50)),
    ],
    "hamburger": [
        (_ellipse(0.0, -0.1, 0.35, 0.15), (200, 140, 60)),
        (_rect(-0.36, -0.02, 0.36, 0.06), (60, 160, 40)),
        (_rect(-0.34, 0.06, 0.34, 0.15), (110, 50, 30)),
        (_ellipse(0.0, 0.2, 0.34, 0.07), (200, 140, 60)),
    ],
}


def _procedural_shape(category: str) -> list[tuple[Polygon, tuple[int, int, int]]]:
    """A regular polygon with a category-specific side count, aspect and colour."""
    digest = hashlib.sha256(category.encode()).digest()
    sides = 3 + digest[0] % 6
    aspect = 0.6 + digest[1] / 255 * 0.8
    colour = (digest[2] // 2 + 60, digest[3] // 2 + 60, digest[4] // 2 + 60)
    body = [(0.38 * math.cos(2 * math.pi * i / sides), 0.38 * aspect * math.sin(2 * math.pi * i / sides)) for i in range(sides)]
    return [(body, colour), (_ellipse(0.0, 0.0, 0.08, 0.08), tuple(255 - c for c in colour))]


def shape_parts(category: str) -> list[tuple[Polygon, tuple[int, int, int]]]:
    """The parts that make up a category's shape."""
    return _SHAPES.get(category) or _procedural_shape(category)


@dataclass(frozen=True)
class Pose:
    """Where and how a shape is drawn; shared by a photo and all of its sketches."""

    cx: float
    cy: float
    scale: float
    angle: float
    mirror: bool

    @classmethod
    def random(cls, rng: random.Random) -> Pose:
        return cls(
            cx=rng.uniform(0.4, 0.6), cy=rng.uniform(0.4, 0.6), scale=rng.uniform(0.65, 0.95),
            angle=rng.uniform(-0.45, 0.45), mirror=rng.random() < 0.5,
        )

    def apply(self, polygon: Polygon, size: int) -> Polygon:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        points = []
        for x, y in polygon:
            x = -x if self.mirror else x
            rx, ry = x * cos - y * sin, x * sin + y * cos
            points.append(((self.cx + rx * self.scale) * size, (self.cy + ry * self.scale) * size))
        return points


def draw_photo(category: str, pose: Pose, size: int, rng: random.Random) -> Image.Image:
    """A 'photo': the filled shape on a smooth, noisy background."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.randint(150, 235) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(-25, 25, size, dtype=np.float32)[None, :, None] * np.array([1, 0.5, -0.5], dtype=np.float32)
    background = base + ramp + np_rng.normal(0, 8, (size, size, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for polygon, colour in shape_parts(category):
        shade = rng.randint(-20, 20)
        fill = tuple(int(np.clip(c + shade, 0, 255)) for c in colour)
        outline = tuple(max(0, c - 70) for c in fill)
        draw.polygon(pose.apply(polygon, size), fill=fill, outline=outline)
    return image


def draw_sketch(category: str, pose: Pose, size: int, rng: random.Random, scribble: bool = False) -> Image.Image:
    """A 'sketch': wobbly black outlines of the same parts in the same pose (or a scribble)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    width = max(1, size // 96)
    jitter = size * 0.012
    if scribble:
        points = [(rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size) for _ in range(12)]
        draw.line(points, fill="black", width=width)
        return image
    for polygon, _ in shape_parts(category):
        points = [(x + rng.gauss(0, jitter), y + rng.gauss(0, jitter)) for x, y in pose.apply(polygon, size)]
        draw.line(points + points[:1], fill="black", width=width, joint="curve")
    return image


def make_synthetic_sketchy(
    root: str | Path,
    categories: tuple[str, ...] | list[str] = DEFAULT_CATEGORIES,
    photos_per_category: int = 8,
    sketches_per_photo: int = 3,
    test_photos_per_category: int = 2,
    size: int = 256,
    invalid_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, int]:
    """Write a synthetic release at `root`; returns counts. Same seed, same bytes."""
    root = Path(root)
    photo_root = root / RENDERED / "photo" / DEFAULT_AUGMENTATION
    sketch_root = root / RENDERED / "sketch" / DEFAULT_AUGMENTATION
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stats_rows, testset = [], []
    invalid: dict[str, list[str]] = {"error": [], "ambiguous": [], "pose": [], "context": []}
    n_photos = n_sketches = 0
    for cat_index, category in enumerate(sorted(categories)):
        (photo_root / category).mkdir(parents=True, exist_ok=True)
        (sketch_root / category).mkdir(parents=True, exist_ok=True)
        synset = f"n{2100000 + 7919 * (cat_index + 1):08d}"
        image_ids = sorted(rng.sample(range(100, 99999), photos_per_category))
        photo_ids = [f"{synset}_{i}" for i in image_ids]
        for photo_id in rng.sample(photo_ids, min(test_photos_per_category, len(photo_ids))):
            testset.append(f"{category}/{photo_id}.jpg")
        for photo_id in photo_ids:
            pose = Pose.random(rng)
            draw_photo(category, pose, size, rng).save(photo_root / category / f"{photo_id}.jpg", quality=90)
            n_photos += 1
            for k in range(1, sketches_per_photo + 1):
                sketch_id = f"{photo_id}-{k}"
                flag = rng.choice(list(invalid)) if rng.random() < invalid_fraction else None
                if flag:
                    invalid[flag].append(sketch_id)
                draw_sketch(category, pose, size, rng, scribble=flag == "error").save(sketch_root / category / f"{sketch_id}.png")
                n_sketches += 1
                stats_rows.append([
                    cat_index + 1, category_words(category), photo_id, k, rng.randint(1, 5), rng.randint(3, 40),
                    int(flag == "error"), int(flag == "context"), int(flag == "ambiguous"), int(flag == "pose"),
                ])
    from sketch2real.sketchy import STATS_COLUMNS

    with open(info / "stats.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(STATS_COLUMNS)
        writer.writerows(stats_rows)
    (info / "testset.txt").write_text("\n".join(sorted(testset)) + "\n")
    (root / "README.txt").write_text("A synthetic Sketchy release (sketch2real.synthetic): shapes, not the real photos.\n")
    for kind, ids in invalid.items():
        (info / f"invalid-{kind}.txt").write_text("".join(f"{i}\n" for i in sorted(ids)))
    return {"categories": len(categories), "photos": n_photos, "sketches": n_sketches,
            "invalid": sum(len(v) for v in invalid.values()), "test_photos": len(testset)}
