"""A probe for tests that signal a training run mid-way: with this folder on PYTHONPATH and S2R_PROBE_PAUSE_AT_STEP=N,
S2R_PROBE_PAUSE_FILE=PATH, every trainer process writes PATH.rank<R> (its pid) at step N and waits there until a
preemption signal reaches it (S2R_PROBE_PAUSE_RUN=NAME: only in a run whose folder is named NAME, a sequential stage's). The test signals once the file exists: an event, never a clock, so the run cannot end before the
signal arrives (tests/test_two_nodes.py, tests/test_slurm.py). A requeued run resumes past step N and never waits."""

import os
import sys

if os.environ.get("S2R_PROBE_PAUSE_AT_STEP"):
    import importlib.abc
    import importlib.util

    def _add_pause(callbacks) -> None:
        import time
        from pathlib import Path

        from sketch2real.training.preemption import preemption

        at, marker, make = int(os.environ["S2R_PROBE_PAUSE_AT_STEP"]), os.environ["S2R_PROBE_PAUSE_FILE"], callbacks.default_callbacks
        run_name = os.environ.get("S2R_PROBE_PAUSE_RUN")

        class Pause(callbacks.Callback):
            def after_step(self, run):
                if run.step == at and run_name in (None, run.out.name):
                    Path(f"{marker}.rank{run.accelerator.process_index}").write_text(str(os.getpid()))
                    while not preemption:  # the next read's collective tells every rank
                        time.sleep(0.05)
                return None

        callbacks.default_callbacks = lambda: [Pause(), *make()]

    class _PatchCallbacks(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "sketch2real.training.callbacks":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                _add_pause(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchCallbacks())
