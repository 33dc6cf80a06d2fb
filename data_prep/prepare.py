"""Splits, then shards, of a Sketchy release in one command (what slurm/data_prep.sh runs): the splits go to
`--data_dir`/splits, the shards to `--data_dir`/shards, and every other flag to the step that takes it (build_splits.py's
and make_shards.py's flags: see their --help), so a job's extra flags reach either script."""

from __future__ import annotations

import sys
from pathlib import Path

import build_splits
import make_shards

from sketch2real.cli import UserError, route_flags, run_main

STEPS = {"build_splits.py": build_splits.Options, "make_shards.py": make_shards.Options}


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: prepare.py --data_dir DIR --sketchy_root ROOT [flags of either step]")
        return
    if argv[0] != "--data_dir" or len(argv) < 2:
        raise UserError("give --data_dir DIR first (splits and shards are written under it)")
    data, argv = Path(argv[1]), argv[2:]
    routed = route_flags(argv, STEPS)
    written_here = {"--output_dir", "--splits_dir"}.intersection(t.split("=", 1)[0] for t in argv)
    if written_here:
        raise UserError(f"{sorted(written_here)[0]}: prepare.py writes DATA_DIR/splits and DATA_DIR/shards (--data_dir)")
    build_splits.main([*routed["build_splits.py"], "--output_dir", str(data / "splits")])
    make_shards.main([*routed["make_shards.py"], "--splits_dir", str(data / "splits"), "--output_dir", str(data / "shards")])


if __name__ == "__main__":
    run_main(main)
