"""Textual Inversion of the Sketchy sketch style: `accelerate launch train/textual_inversion.py --help`."""

from sketch2real.cli import parse_options, run_main
from sketch2real.training.accelerator import training_session
from sketch2real.training.checkpoints import check_resume, finished_run
from sketch2real.training.loop import train
from sketch2real.training.textual_inversion import TextualInversionOptions, TextualInversionTask


def main() -> int:
    opts = parse_options(TextualInversionOptions)
    opts.check()
    with training_session(opts) as accelerator:
        if finished_run(accelerator, opts):  # a resubmitted job of a finished run
            return 0
        check_resume(accelerator, opts)  # checkpoints it cannot resume: now, not after the model loads
        return train(TextualInversionTask(opts, accelerator), opts, accelerator, "textual_inversion")


if __name__ == "__main__":
    run_main(main)
