"""Sequential-class DreamBooth with forgetting measured: `accelerate launch train/dreambooth_sequential.py --help`."""

from sketch2real.cli import parse_options, run_main
from sketch2real.training.accelerator import training_session
from sketch2real.training.sequential import SequentialOptions, run_sequential


def main() -> int:
    opts = parse_options(SequentialOptions)
    opts.check()
    with training_session(opts) as accelerator:
        return run_sequential(opts, accelerator)


if __name__ == "__main__":
    run_main(main)
