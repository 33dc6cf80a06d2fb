"""Write a synthetic Sketchy release (the real folder layout as its archives extract, info/ lists) for tests and the demo."""

from dataclasses import dataclass

from sketch2real.cli import UserError, check_output_dir, lock_output_dir, option, parse_options, run_main
from sketch2real.synthetic import DEFAULT_CATEGORIES, make_synthetic_sketchy


@dataclass(frozen=True)
class Options:
    """Write a synthetic Sketchy release in the real layout."""

    output_dir: str = option(help="release root to write (256x256/ and info/ go inside)")
    categories: list[str] = option(list(DEFAULT_CATEGORIES), help="category folder names")
    photos_per_category: int = option(8, help="photos per category (ids are drawn from 99899 numbers)", min=1, max=99899)
    sketches_per_photo: int = option(3, help="sketches per photo", min=1)
    test_photos_per_category: int = option(2, help="photos per category listed in info/testset.txt", min=0)
    resolution: int = option(256, help="image side in pixels", min=8)
    invalid_fraction: float = option(0.1, help="fraction of sketches flagged in the invalid-*.txt lists", min=0, max=1)
    seed: int = option(0, help="random seed: same seed, same files", min=0)


def main() -> None:
    opts = parse_options(Options)
    if opts.test_photos_per_category >= opts.photos_per_category:
        raise UserError("--test_photos_per_category must leave some photos for training")
    lock_output_dir(check_output_dir(opts.output_dir))
    counts = make_synthetic_sketchy(
        opts.output_dir, opts.categories, opts.photos_per_category, opts.sketches_per_photo,
        opts.test_photos_per_category, opts.resolution, opts.invalid_fraction, opts.seed,
    )
    print(f"synthetic Sketchy at {opts.output_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    run_main(main)
