"""ZeRO-3 start-up probe (run under `accelerate launch` with the ZeRO-3 config, see tests/test_flow_families.py).

`zero3_startup.py REPORT SCRIPT ARGS...` runs a training script with a spy on the DeepSpeed engine's set-up: when the
engine is handed the model, how many of its parameter elements does this rank hold whole (a module DeepSpeed gets
whole is moved to the device whole before it is partitioned)? Written to REPORT.rank<N>.json.
"""

import atexit
import json
import os
import runpy
import sys


def main() -> None:
    report, script, *args = sys.argv[1:]
    from deepspeed.runtime.engine import DeepSpeedEngine

    seen = {}
    configure = DeepSpeedEngine._configure_distributed_model

    def spy(self, model):
        params = list(model.parameters())
        seen.update(elements=sum(getattr(p, "ds_numel", p.numel()) for p in params),
                    held_whole=sum(p.data.numel() for p in params),
                    partitioned=sum(hasattr(p, "ds_id") for p in params), parameters=len(params))
        return configure(self, model)

    DeepSpeedEngine._configure_distributed_model = spy

    def write_report() -> None:
        with open(f"{report}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(seen, f)

    atexit.register(write_report)  # the script ends its process itself (sketch2real.cli.exit_now) after atexit
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
