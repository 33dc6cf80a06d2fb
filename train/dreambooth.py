"""DreamBooth on Sketchy shards: `accelerate launch train/dreambooth.py --help`."""

from sketch2real.cli import parse_options, run_main
from sketch2real.training.accelerator import training_session
from sketch2real.training.checkpoints import check_resume, finished_run
from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask
from sketch2real.training.loop import train


def main() -> int:
    opts = parse_options(DreamBoothOptions)
    opts.check()
    with training_session(opts) as accelerator:
        if finished_run(accelerator, opts):  # a resubmitted job of a finished run
            return 0
        check_resume(accelerator, opts)  # checkpoints it cannot resume: now, not after the model loads
        task = DreamBoothTask(opts, accelerator)
        return train(task, task.opts, accelerator, "dreambooth")  # its options as the data resolved them


if __name__ == "__main__":
    run_main(main)
