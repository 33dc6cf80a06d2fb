"""Write a synthetic Sketchy release (exact folder layout, info/ lists) for tests and the demo."""

from dataclasses import dataclass

from sketch2real.cli import UserError, option, parse_options, run_main
from sketch2real.synthetic import DEFAULT_CATEGORIES, make_synthetic_sketchy


@dataclass
class Options:
    """Write a synthetic Sketchy release in the real layout."""

    output_dir: str = option(help="release root to write (rendered_256x256/ and info/ go inside)")
    categories: list[str] = option(list(DEFAULT_CATEGORIES), help="category folder names")
    photos_per_category: int = option(8, help="photos per category")
    sketches_per_photo: int = option(3, help="sketches per photo")
    test_photos_per_category: int = option(2, help="photos per category listed in info/testset.txt")
    resolution: int = option(256, help="image side in pixels")
    invalid_fraction: float = option(0.1, help="fraction of sketches flagged in the invalid-*.txt lists")
    seed: int = option(0, help="random seed: same seed, same files")


def main() -> None:
    opts = parse_options(Options)
    if opts.photos_per_category < 1 or opts.sketches_per_photo < 1:
        raise UserError("--photos_per_category and --sketches_per_photo must be at least 1")
    if opts.test_photos_per_category >= opts.photos_per_category:
        raise UserError("--test_photos_per_category must leave some photos for training")
    counts = make_synthetic_sketchy(
        opts.output_dir, opts.categories, opts.photos_per_category, opts.sketches_per_photo,
        opts.test_photos_per_category, opts.resolution, opts.invalid_fraction, opts.seed,
    )
    print(f"synthetic Sketchy at {opts.output_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    run_main(main)
