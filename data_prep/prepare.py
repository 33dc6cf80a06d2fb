"""Splits, then shards, of a Sketchy release in one command (what slurm/data_prep.sh runs): the splits go to
`--data_dir`/splits, the shards to `--data_dir`/shards, and every other flag to the step that takes it (build_splits.py's
and make_shards.py's flags: see their --help), so a job's extra flags reach either script. `--config FILE` (YAML or
JSON) may hold options of either step (and data_dir); its values stand where it is, as for every script. Both steps'
options are checked before anything is written."""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import build_splits
import make_shards

from sketch2real.cli import UserError, load_config, parse_options, route_flags, run_main

STEPS = {"build_splits.py": build_splits.Options, "make_shards.py": make_shards.Options}
WRITTEN_HERE = ("output_dir", "splits_dir")  # prepare.py sets them from --data_dir


def _take_flag(argv: list[str], flag: str) -> tuple[list[str], list[str]]:
    """(the values given to `flag`, as `FLAG V` or `FLAG=V` anywhere in `argv`; `argv` without them)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name != flag:
            rest.append(argv[i])
        elif eq:
            values.append(value)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values.append(argv[i + 1])
            i += 1
        else:
            raise UserError(f"{flag} needs a value")
        i += 1
    return values, rest


def _step_configs(path: str, folder: Path) -> tuple[dict[str, Path], str | None]:
    """A `--config` file cut into one file per step (each step refuses another's options); and its data_dir, if any."""
    loaded = load_config(path)
    fields = {step: {f.name for f in dataclasses.fields(cls)} for step, cls in STEPS.items()}
    for name in loaded:
        if name in WRITTEN_HERE:
            raise UserError(f"{name} in config file {path}: prepare.py writes DATA_DIR/splits and DATA_DIR/shards (data_dir)")
        if name != "data_dir" and not any(name in names for names in fields.values()):
            raise UserError(f"unknown option {name} in config file {path}: "
                            + "; ".join(f"{step} takes {' '.join(sorted(names))}" for step, names in fields.items()))
    files = {}
    for step, names in fields.items():
        files[step] = folder / f"{Path(step).stem}.json"
        files[step].write_text(json.dumps({k: v for k, v in loaded.items() if k in names}, default=str))
    data_dir = loaded.get("data_dir")
    return files, None if data_dir is None else str(data_dir)


def _step_argvs(argv: list[str], folder: Path) -> tuple[dict[str, list[str]], str | None, str | None]:
    """Each step's flags (a `--config` file's share standing where the file is); the --data_dir given; the config."""
    data_dirs, argv = _take_flag(argv, "--data_dir")
    if len(data_dirs) > 1:
        raise UserError("--data_dir is given more than once")
    configs, _ = _take_flag(argv, "--config")
    if len(configs) > 1:
        raise UserError("--config is given more than once: give one file (put what differs in flags after it)")
    at = next((i for i, t in enumerate(argv) if t.partition("=")[0] == "--config"), len(argv))
    before, after = argv[:at], argv[at + (1 if "=" in argv[at] else 2):] if configs else []
    written = {"--output_dir", "--splits_dir"}.intersection(t.split("=", 1)[0] for t in argv)
    if written:
        raise UserError(f"{sorted(written)[0]}: prepare.py writes DATA_DIR/splits and DATA_DIR/shards (--data_dir)")
    routed_before, routed_after = route_flags(before, STEPS), route_flags(after, STEPS)
    config_data_dir = None
    files: dict[str, Path] = {}
    if configs:
        files, config_data_dir = _step_configs(configs[0], folder)
    argvs = {step: [*routed_before[step], *(["--config", str(files[step])] if files else []), *routed_after[step]]
             for step in STEPS}
    return argvs, data_dirs[0] if data_dirs else config_data_dir, configs[0] if configs else None


def main() -> None:
    argv = sys.argv[1:]
    if not argv or {"-h", "--help"} & set(argv):  # anywhere, as argparse reads it (after flags: "unknown option")
        print(__doc__.strip() + "\n\nusage: prepare.py --data_dir DIR --sketchy_root ROOT [--config FILE] [flags of either step]")
        return
    with tempfile.TemporaryDirectory(prefix="s2r-prepare-") as folder:
        argvs, data_dir, config = _step_argvs(argv, Path(folder))
        if not data_dir:
            raise UserError("give --data_dir DIR (splits and shards are written under it)")
        data = Path(data_dir)
        argvs["build_splits.py"] += ["--output_dir", str(data / "splits")]
        argvs["make_shards.py"] += ["--splits_dir", str(data / "splits"), "--output_dir", str(data / "shards")]
        try:  # both steps' options checked before the first writes anything
            make_shards.check_options(parse_options(make_shards.Options, argvs["make_shards.py"]))
            parse_options(build_splits.Options, argvs["build_splits.py"])
            build_splits.main(argvs["build_splits.py"])
            make_shards.main(argvs["make_shards.py"])
        except UserError as err:  # a config value's error names the user's file, not this step's share of it
            message = str(err)
            for step in STEPS:
                message = message.replace(str(Path(folder) / f"{Path(step).stem}.json"), config or "")
            raise UserError(message) from None


if __name__ == "__main__":
    run_main(main)
