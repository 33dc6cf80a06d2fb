"""A sketch -> photo ControlNet on Sketchy's pairs: `accelerate launch train/controlnet.py --help`."""

from sketch2real.cli import parse_options, run_main
from sketch2real.training.accelerator import training_session
from sketch2real.training.checkpoints import check_resume, finished_run
from sketch2real.training.controlnet import ControlNetOptions, ControlNetTask
from sketch2real.training.loop import train


def main() -> int:
    opts = parse_options(ControlNetOptions)
    opts.check()
    with training_session(opts) as accelerator:
        if finished_run(accelerator, opts):  # a resubmitted job of a finished run
            return 0
        check_resume(accelerator, opts)  # checkpoints it cannot resume: now, not after the model loads
        return train(ControlNetTask(opts, accelerator), opts, accelerator, "controlnet")


if __name__ == "__main__":
    run_main(main)
