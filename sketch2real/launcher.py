"""`accelerate launch` as the Slurm jobs run it (`python -m sketch2real.launcher ARGS`, ARGS as accelerate's): the
job ends with its trainer's own exit status and line, not torchrun's.

accelerate's launchers end a failed run with a traceback of their own (torchrun's `ChildFailedError` block, ~30
lines, or the one-process launcher's `CalledProcessError`) after the trainer's one-line error, and turn its status
into 1: a bad input (2) read as a crash, and a preempted trainer's 75 was lost. Here the status is the ranks' own
(2, 75, ...; a signal as the shell reports it, 128 + its number), and a rank that died without saying why (killed
by a signal, a crash) is named in one line.

75 (preempted: slurm/common.sh requeues the job) only where the job was asked to stop: every rank stopped on a signal
and left PREEMPTED, or the launcher itself was signalled (Slurm's SIGTERM) and its ranks left PREEMPTED. Where a rank
failed first (a crash, the out-of-memory killer), torchrun stops the others with SIGTERM, which they take for a
preemption and leave PREEMPTED: the job failed with the first rank's status, and a requeue would fail again, without
end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sketch2real.cli import EXIT_USAGE, output_dir_of
from sketch2real.training.preemption import PREEMPTED_EXIT_CODE

INTERRUPTED = 130  # a script's status after Ctrl-C (`cli.run_main`: its line "interrupted")
SAID_ITS_OWN = (EXIT_USAGE, PREEMPTED_EXIT_CODE, INTERRUPTED)  # statuses whose trainer printed its own line
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what the ranks save a checkpoint on; Ctrl-C stops them at once


def exit_status(code: int) -> int:
    """A process's status as a shell reports it: a signal N (Python's -N) is 128 + N."""
    return 128 - code if code < 0 else code


def failure_line(rank: int, code: int) -> str:
    """One line naming a rank (of this node: each node's launcher watches its own) that failed without a line of its
    own."""
    import socket

    host = socket.gethostname()
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"launcher: error: rank {rank} on {host} was killed by {name}{hint}"
    return f"launcher: error: rank {rank} on {host} exited with status {code} (its error is above)"


def _interrupt_unless_a_child_runs(signum, frame) -> None:
    """Ctrl-C: a running script (the terminal signalled it too) ends with its own line and status, which the launcher
    waits for; with none yet, the launcher ends now. (torchrun's agent installs its own handler once its ranks run.)"""
    try:  # Linux's list of a thread's children (none listed where the kernel keeps no such list: then wait)
        listed = [f.read_text().split() for f in Path(f"/proc/{os.getpid()}/task").glob("*/children")]
    except OSError:
        return
    if listed and not any(listed):
        raise KeyboardInterrupt


def _one_process_launcher(args) -> None:
    """accelerate's one-process launcher, waiting for the trainer whatever the launcher is sent: accelerate 1.16's own
    takes SIGTERM to end the launcher and stop the trainer, killing it 5 s later, mid-checkpoint (no requeue)."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(cmd, env=env)
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, cmd)


def _signalled(sig: signal.Signals, args, started: float) -> None:
    """The launcher itself was signalled (torchrun's agent stopped the ranks with that signal): exit 75 where it was
    a preemption signal and the ranks saved their work in this job (a PREEMPTED an earlier job left says nothing)."""
    output_dir = output_dir_of(args.training_script_args)
    marker = Path(output_dir) / "PREEMPTED"
    preempted = (bool(output_dir) and sig in PREEMPTION_SIGNALS and marker.is_file()
                 and marker.stat().st_mtime >= started)
    print(f"launcher: stopped by {sig.name}: so were the ranks" + (
        f" (they saved their work: {output_dir}/PREEMPTED)" if preempted else ""), file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE if preempted else exit_status(-sig))


def main() -> None:
    import time

    import accelerate.commands.launch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args()
    started = time.time()
    # One process (accelerate's simple launcher): SIGTERM to every process of a Slurm step would end this waiting
    # parent at once, and the step with it, while the trainer saves its checkpoint; Ctrl-C, which a terminal sends
    # to both, ended it in a KeyboardInterrupt traceback before the trainer had stopped: wait for the trainer's own
    # status. (Handlers, not SIG_IGN, which the trainer would inherit; torchrun installs its own for several processes.)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, _interrupt_unless_a_child_runs)
    accelerate.commands.launch.simple_launcher = _one_process_launcher
    try:
        launch_command(args)
    except KeyboardInterrupt:  # before any process started
        print("launcher: interrupted", file=sys.stderr)
        sys.exit(exit_status(-signal.SIGINT))
    except subprocess.CalledProcessError as err:  # one process
        if err.returncode not in SAID_ITS_OWN:
            print(failure_line(0, err.returncode), file=sys.stderr)
        sys.exit(exit_status(err.returncode))
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        codes = {failure.exitcode for failure in err.failures.values()}
        code = codes.pop() if len(codes) == 1 else first.exitcode  # ranks that agree; else the first to fail
        if code not in SAID_ITS_OWN:
            print(failure_line(rank, first.exitcode), file=sys.stderr)
        sys.exit(exit_status(code))
    except SignalException as err:  # torchrun's agent itself was signalled, and stopped the ranks with that signal
        _signalled(err.sigval, args, started)
    except SystemExit as stop:  # accelerate >= 1.16 ends the agent's SignalException itself: exit(128 + the signal)
        if isinstance(stop.__context__, KeyboardInterrupt):  # ours, before any process started (it exits 130 for it)
            print("launcher: interrupted", file=sys.stderr)
            raise
        if isinstance(stop.code, int) and stop.code - 128 in set(signal.Signals):
            _signalled(signal.Signals(stop.code - 128), args, started)
        raise


if __name__ == "__main__":
    main()
