"""Build the test models: `python -m sketch2real.testing.build --output_dir DIR [--torch_home DIR] [--pretrain]`
(`--size sd15` etc.: one Stable Diffusion of a full architecture with random weights, for benchmarks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sketch2real.cli import check_output_dir, log_to_stderr, option, parse_options, run_main
from sketch2real.testing.pretrain import PRETRAINED_DIRNAME, pretrain_tiny_sd
from sketch2real.testing.tiny import SD_SIZES, build_all, build_sd


@dataclass(frozen=True)
class Options:
    """Build the tiny offline models (SD, CLIP, DINOv2, BLIP-2, LLaVA, FID Inception weights)."""

    output_dir: str = option("tiny_models", help="folder that receives tiny-sd/, tiny-blip2/, tiny-llava/")
    torch_home: str = option("", help="TORCH_HOME for the Inception weights (default: OUTPUT_DIR/torch_home)")
    size: str = option("tiny", help="tiny: every tiny model; any other: only a Stable Diffusion of that architecture with "
                                    "random weights, at OUTPUT_DIR/<size>-random",
                      choices=tuple(size for size, parts in SD_SIZES.items() if "unet" in parts))
    pretrain: bool = option(False, help="also train the tiny base on a synthetic Sketchy (~6 min on 2 cores, cached) "
                                        "at OUTPUT_DIR/tiny-sd-trained")


def main() -> None:
    opts = parse_options(Options)
    check_output_dir(opts.output_dir)
    if opts.size != "tiny":
        print(f"sd: {build_sd(Path(opts.output_dir) / f'{opts.size}-random', opts.size)}")
        return
    models = build_all(opts.output_dir, opts.torch_home or None)
    for name, path in vars(models).items():
        print(f"{name}: {path}")
    if opts.pretrain:
        log_to_stderr(logging.INFO)  # its progress and result lines (run_main's default shows warnings only)
        print(f"sd_trained: {pretrain_tiny_sd(Path(opts.output_dir) / PRETRAINED_DIRNAME)}")


if __name__ == "__main__":
    run_main(main)
