"""Sequential-class DreamBooth with forgetting measured: `accelerate launch train/dreambooth_sequential.py --help`."""

from sketch2real.cli import parse_options, run_main
from sketch2real.training.accelerator import make_accelerator
from sketch2real.training.sequential import SequentialOptions, run_sequential


def main() -> int:
    opts = parse_options(SequentialOptions)
    opts.check()
    return run_sequential(opts, make_accelerator(opts))


if __name__ == "__main__":
    run_main(main)
