"""A probe for the checkpoint's rank race: with this folder on PYTHONPATH and S2R_PROBE_LATE_RANK=R, rank R writes
its random states only once rank 0's manifest.json is in the checkpoint folder (or after S2R_PROBE_LATE_SECONDS,
default 10, when a barrier rightly keeps the manifest back): a slower rank, made certain."""

import os

if os.environ.get("S2R_PROBE_LATE_RANK"):
    import time
    from pathlib import Path

    import torch

    late, wait, save = f"random_states_{os.environ['S2R_PROBE_LATE_RANK']}.pkl", float(
        os.environ.get("S2R_PROBE_LATE_SECONDS", "10")), torch.save

    def _late_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).name == late:
            deadline = time.monotonic() + wait
            while not (Path(f).parent / "manifest.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return save(obj, f, *args, **kwargs)

    torch.save = _late_save
