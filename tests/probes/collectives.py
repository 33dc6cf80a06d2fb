"""Two-process probes of what the process group promises (run under `accelerate launch`, see tests/test_cluster.py).

timeout-train / timeout-infer: rank 1 reaches a barrier 90 s late; with a 3 s --ddp_timeout rank 0 must give up.
shared: rank 1 is given another folder than rank 0 (a node-local disk): both must stop with one line.
"""

import sys
import time

from sketch2real.cli import run_main


def main() -> int:
    mode, folder = sys.argv[1], sys.argv[2]
    from sketch2real.training.accelerator import check_shared_folder, distributed_state, make_accelerator

    if mode == "timeout-train":
        from sketch2real.training.options import TrainOptions

        state = make_accelerator(TrainOptions(pretrained_model_name_or_path="unused", output_dir=folder, ddp_timeout=3,
                                              report_to="none"))
    else:
        state = distributed_state(3 if mode == "timeout-infer" else 60)
    if mode == "shared":
        check_shared_folder(state, folder if state.process_index == 0 else f"{folder}-rank1")
        return 0
    if state.process_index == 1:
        time.sleep(90)
    state.wait_for_everyone()
    print("barrier passed", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
