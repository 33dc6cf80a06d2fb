"""Photo-level, leak-free, seeded train/val/test splits of a Sketchy release."""

import logging
from dataclasses import dataclass

from sketch2real.cli import check_output_dir, lock_output_dir, option, parse_options, run_main
from sketch2real.sketchy import (
    DEFAULT_AUGMENTATION,
    INVALID_KINDS,
    PHOTO_AUGMENTATIONS,
    SKETCH_AUGMENTATIONS,
    SketchyRelease,
)
from sketch2real.splits import build_splits, format_report, warn_absent, write_splits

logger = logging.getLogger("sketch2real")


@dataclass(frozen=True)
class Options:
    """Split a Sketchy release by photo: test = info/testset.txt, val = a seeded fraction of the rest."""

    sketchy_root: str = option(help="release root holding 256x256/ (or rendered_256x256/256x256/) and info/")
    output_dir: str = option(help="folder for {train,val,test}.jsonl and report.{json,md}")
    val_fraction: float = option(0.1, help="fraction of non-test photos per category held out for validation",
                                 min=0, max_exclusive=1)
    seed: int = option(0, help="seed of the validation draw: same seed, same files", min=0)
    categories: list[str] = option([], help="only these categories (default: all)")
    keep_invalid: list[str] = option([], help="invalid lists to keep (default: exclude all)", choices=INVALID_KINDS,
                                     noun="invalid list")
    photo_augmentation: str = option(DEFAULT_AUGMENTATION, help="photo/ rendering to read: tx_000000000000 (scaled to "
                                     "256x256), tx_000100000000 (bounding box +10%%)", choices=PHOTO_AUGMENTATIONS)
    sketch_augmentation: str = option(DEFAULT_AUGMENTATION, help="sketch/ rendering to read (the release's README.txt): "
                                      "tx_000000000000 is aligned with its photo's tx_000000000000, the others are "
                                      "re-centred or re-scaled", choices=SKETCH_AUGMENTATIONS)
    info_dir: str = option("", help="info/ folder if not under the root")
    strict_testset: bool = option(False, help="fail if testset.txt names photos absent from the release")


def main(argv: list[str] | None = None) -> None:
    opts = parse_options(Options, argv)
    if (opts.photo_augmentation, opts.sketch_augmentation) != (DEFAULT_AUGMENTATION, DEFAULT_AUGMENTATION):
        logger.warning("photo %s with sketch %s: not pixel-aligned pairs (only tx_000000000000 with tx_000000000000 "
                       "are); a ControlNet and the pairing scores learn and measure alignment", opts.photo_augmentation,
                       opts.sketch_augmentation)
    release = SketchyRelease(opts.sketchy_root, opts.photo_augmentation, opts.sketch_augmentation, opts.info_dir or None)
    result = build_splits(release, opts.val_fraction, opts.seed, tuple(opts.keep_invalid), opts.categories or None,
                          opts.strict_testset)
    lock_output_dir(check_output_dir(opts.output_dir))
    write_splits(result, opts.output_dir)
    warn_absent(result.report)
    print(format_report(result.report), end="")
    print(f"splits written to {opts.output_dir}")


if __name__ == "__main__":
    run_main(main)
