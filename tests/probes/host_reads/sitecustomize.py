"""A probe for tests that count the reads of tensor values back to the host (on a GPU, each one waits for every
kernel queued before it): with this folder on PYTHONPATH and S2R_PROBE_HOST_READS=PATH, the process counts every
`item`, `tolist`, `numpy`, `bool`, `float`, `int` and `index` of a tensor (a TorchFunctionMode, for the whole
process) and keeps PATH up to date: {"reads": N, "sites": {"file:function:line": count}}, the site being the innermost
frame of sketch2real's code (else the innermost frame). Reads made inside a function whose qualified name starts with
one of S2R_PROBE_HOST_READS_IGNORE (comma-separated) are not counted: code that only ever holds host tensors (the
batch sampler's permutations, drawn on the CPU). Only the process that loaded it writes (not DataLoader workers),
after every read it counts: a process forked by tests/forkserver.py never runs atexit handlers."""

import os

if os.environ.get("S2R_PROBE_HOST_READS"):
    import collections
    import json
    import sys

    import torch
    from torch.overrides import TorchFunctionMode

    _READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__}
    _sites: collections.Counter = collections.Counter()
    _pid = os.getpid()
    _ignored = tuple(p for p in os.environ.get("S2R_PROBE_HOST_READS_IGNORE", "").split(",") if p)

    def _site() -> str | None:
        frame, innermost, ours = sys._getframe(2), None, None
        while frame is not None:
            code = frame.f_code
            if _ignored and code.co_qualname.startswith(_ignored):
                return None
            where = f"{os.path.basename(code.co_filename)}:{code.co_qualname}:{frame.f_lineno}"
            innermost = innermost or where
            if ours is None and "sketch2real" in code.co_filename and "probes" not in code.co_filename:
                ours = where
            frame = frame.f_back
        return ours or innermost or "?"

    class _CountReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in _READS:
                site = _site()
                if site is not None:
                    _sites[site] += 1
                    _write()
            return func(*args, **(kwargs or {}))

    def _write() -> None:
        if os.getpid() == _pid:
            with open(os.environ["S2R_PROBE_HOST_READS"], "w") as f:
                json.dump({"reads": sum(_sites.values()), "sites": dict(_sites)}, f)

    _write()  # no read yet
    _CountReads().__enter__()
