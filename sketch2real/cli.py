"""Options as dataclasses, flags named as in diffusers' examples, and one-line errors.

Every entry script declares a dataclass of options; `parse_options` turns it into
an argparse parser (help text, ranges and choices from field metadata), lets
`--config FILE` (YAML or JSON) set the same fields through the very same parser,
and `run_main` turns a `UserError` into one line on stderr and exit status 2
instead of a traceback.

Ranges and choices are declared once per option, e.g. `option(512, help=..., min=8,
multiple_of=8)`, shown in `--help`, and checked by `option_problem` for flags and
config values alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_USAGE = 2
RANGE_KEYS = ("min", "min_exclusive", "max", "max_exclusive", "multiple_of", "choices")

# --mixed_precision of every script (trainers, generation, captioning): `models.requested_precision` resolves it
PRECISION_HELP = ("no, fp16 or bf16 (fp16 needs CUDA); default: accelerate's setting (config file, accelerate launch "
                  "--mixed_precision, ACCELERATE_MIXED_PRECISION), else no")


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2. `same_on_every_rank`: every process of a
    launch raises it alike (rank 0 looked for all of them): each node's first process says it, not each of its 8
    GPUs (every node's log keeps it: srun may kill a node's tasks before rank 0 has printed)."""

    same_on_every_rank = False

    @classmethod
    def on_every_rank(cls, message: str) -> UserError:
        """The error every process of a launch raises alike (from what they all share), said once per node."""
        error = cls(message)
        error.same_on_every_rank = True
        return error


def on_other_rank() -> bool:
    """Whether this is a launched process other than its node's first (torchrun's LOCAL_RANK)."""
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0")


AFFECTS = ("result", "runtime", "selection")


def option(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
           min_exclusive: float | None = None, max: float | None = None, max_exclusive: float | None = None,
           multiple_of: int | None = None, choices: typing.Sequence[Any] | None = None, noun: str | None = None,
           affects: str = "result", aliases: typing.Sequence[str] = (), case_insensitive: bool = False,
           **kwargs: Any) -> Any:
    """A dataclass field with a help text and, for numbers and fixed sets of values, its allowed values.

    `min`/`max`: inclusive bounds; `min_exclusive`/`max_exclusive`: strict bounds (a float
    with any bound must also be finite); `multiple_of`: e.g. 8 for pixel sizes; `choices`:
    the allowed values; `noun`: how an unknown choice is named ("unknown {noun} 'x'",
    default: the option's name). For list options each element is checked.
    `aliases`: other flag names (another tool's, e.g. diffusers' `--rank`); `case_insensitive`: a text value is read in
    lower case (`--optimizer AdamW`, as diffusers' scripts). Lists get `default_factory` automatically.
    `affects`: what the option changes (`options_affecting`): "result" (what a job computes), "runtime" (how it runs
    or reports, not what it computes: a resume may change it) or "selection" (which items a job draws, each item's
    result its own: a resume with more draws the rest).
    """
    assert affects in AFFECTS, affects
    meta: dict[str, Any] = {"help": help, "affects": affects}
    given = {"min": min, "min_exclusive": min_exclusive, "max": max, "max_exclusive": max_exclusive,
             "multiple_of": multiple_of, "choices": tuple(choices) if choices is not None else None, "noun": noun,
             "aliases": tuple(aliases) or None, "case_insensitive": case_insensitive or None}
    meta.update({k: v for k, v in given.items() if v is not None})
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def options_affecting(cls: type, affects: str) -> frozenset[str]:
    """The names of the options of dataclass `cls` declared with `option(..., affects=affects)`."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("affects", "result") == affects)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) for a field annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if args and origin is not None:  # Optional / Union
        return _base_type(args[0])
    return tp, False


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _show(value: Any) -> str:
    """A bound or choice as written in help and errors: 8, 0.5, 'text' (quoted only when empty)."""
    return "''" if value == "" else str(value)


def _interval(meta: typing.Mapping[str, Any]) -> str:
    """The declared bounds in words: 'in [0, 1)', '>= 8', '> 0', '<= 10' ('' if none)."""
    low = meta.get("min", meta.get("min_exclusive"))
    high = meta.get("max", meta.get("max_exclusive"))
    if low is not None and high is not None:
        return f"in {'[' if 'min' in meta else '('}{_show(low)}, {_show(high)}{']' if 'max' in meta else ')'}"
    if low is not None:
        return f"{'>=' if 'min' in meta else '>'} {_show(low)}"
    if high is not None:
        return f"{'<=' if 'max' in meta else '<'} {_show(high)}"
    return ""


def describe_range(meta: typing.Mapping[str, Any], many: bool = False) -> str:
    """The allowed values of an option in words, e.g. '>= 8, multiple of 8' or 'in [0, 1)' ('' if unrestricted);
    `many`: a list option, whose every element is checked."""
    parts = [_interval(meta)] if _interval(meta) else []
    if "multiple_of" in meta:
        parts.append(f"multiple of {meta['multiple_of']}")
    if "choices" in meta:
        parts.append(("any of " if many else "one of ") + ", ".join(_show(c) for c in meta["choices"]))
    return ("each " if many and parts and "choices" not in meta else "") + ", ".join(parts)


def _value_problem(name: str, meta: typing.Mapping[str, Any], value: Any) -> str | None:
    """Why one (scalar) value is outside option `name`'s declared range, or None."""
    if "choices" in meta:
        if value not in meta["choices"]:
            noun = meta.get("noun", name.replace("_", " "))
            return f"unknown {noun} {value!r}: --{name} must be one of {', '.join(_show(c) for c in meta['choices'])}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    has_range = any(k in meta for k in ("min", "min_exclusive", "max", "max_exclusive"))
    if isinstance(value, float) and has_range and not math.isfinite(value):
        return f"--{name} must be a finite number {_interval(meta)}, got {value!r}"
    low_ok = ("min" not in meta or value >= meta["min"]) and ("min_exclusive" not in meta or value > meta["min_exclusive"])
    high_ok = ("max" not in meta or value <= meta["max"]) and ("max_exclusive" not in meta or value < meta["max_exclusive"])
    if not (low_ok and high_ok):
        words = {">=": "at least", ">": "greater than", "<=": "at most", "<": "less than"}
        interval = _interval(meta)
        op, _, bound = interval.partition(" ")
        return f"--{name} must be {interval if op == 'in' else words[op] + ' ' + bound}, got {value!r}"
    if "multiple_of" in meta and value % meta["multiple_of"]:
        return f"--{name} must be a multiple of {meta['multiple_of']}, got {value!r}"
    return None


def option_problem(field: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is outside the range/choices declared in `field`'s metadata (one line), or None.

    None is always accepted (Optional fields); for lists every element is checked.
    """
    if value is None:
        return None
    for item in value if isinstance(value, (list, tuple)) else [value]:
        problem = _value_problem(field.name, field.metadata, item)
        if problem:
            return problem
    return None


def check_option_values(options: Any, names: typing.Iterable[str] | None = None) -> None:
    """Raise a one-line `UserError` for the first option (of `names`, default: all) outside its declared range."""
    wanted = None if names is None else set(names)
    for field in dataclasses.fields(options):
        if wanted is None or field.name in wanted:
            problem = option_problem(field, getattr(options, field.name))
            if problem:
                raise UserError(problem)


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (argparse echoes raw arguments)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def error_message(err: BaseException) -> str:
    """An error's message on one line; one raised in a DataLoader worker by its own words, as it said them (torch
    re-raises it in the main process with the worker's whole traceback as its message: ~1,500 characters)."""
    text = str(err)
    if "Original Traceback (most recent call last)" in text:
        last = text.strip().splitlines()[-1]  # "sketch2real.cli.UserError: what it said"
        text = last.split(": ", 1)[1] if last.startswith(f"{type(err).__module__}.{type(err).__name__}: ") else last
    return one_line(text)


class _ParseError(Exception):
    pass


def not_taken_advice(names: list[str], not_taken: dict[str, str]) -> str:
    """What to give instead of each of `names` that another tool's scripts take and these do not (`not_taken`: the
    options class's `FLAGS_NOT_TAKEN`), as '; --name: advice' (empty when none is known)."""
    return "".join(f"; for --{name}: {not_taken[name]}" for name in dict.fromkeys(names) if name in not_taken)


class _Parser(argparse.ArgumentParser):
    raise_errors = False  # True: parsing a config file's values, whose errors must name the file
    not_taken: dict[str, str] = {}  # noqa: RUF012 - set per parser, read only

    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2
        if message.startswith("unrecognized arguments: "):  # a copied command's flag: say what to give instead
            names = [token[2:].split("=")[0] for token in message.split()[2:] if token.startswith("--")]
            message += not_taken_advice(names, self.not_taken)
        if self.raise_errors:
            raise _ParseError(one_line(message))
        # the same command line on every rank: the same line, said once per node
        self.exit(EXIT_USAGE, None if on_other_rank() else f"{self.prog}: error: {one_line(message)}\n")


def default_of(field: dataclasses.Field) -> Any:
    """A field's declared default (a fresh one from its factory); `dataclasses.MISSING` for a required field."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` flag per field of dataclass `cls`."""
    parser = _Parser(
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.not_taken = getattr(cls, "FLAGS_NOT_TAKEN", {})
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of option: value pairs, read exactly like the flags (lists as lists, "
                             "null for optional options); its values stand where --config is: flags after it win, "
                             "flags before it (a job script's defaults) give way")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        scalar, is_list = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if scalar is bool and not is_list:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs["type"] = scalar if scalar in (int, float, str) else str
            if field.metadata.get("case_insensitive"):
                kwargs["type"] = str.lower
            if is_list:
                kwargs["nargs"] = "*"
        default = default_of(field)
        allowed = describe_range(field.metadata, many=is_list).replace("%", "%%")
        if default is dataclasses.MISSING:
            kwargs["help"] += f" (required{'; ' + allowed if allowed else ''})"
        else:
            shown = str(default).replace("%", "%%")
            kwargs["help"] += f" [default: {shown}{'; ' + allowed if allowed else ''}]"
        parser.add_argument(f"--{field.name}", *(f"--{alias}" for alias in field.metadata.get("aliases", ())), **kwargs)
    return parser


def load_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = file.read_text()
        if file.suffix in (".yaml", ".yml"):
            import yaml

            class Loader(yaml.SafeLoader):
                """Booleans are only true/false (YAML 1.2): `mixed_precision: no` is the text 'no', as the flag is."""

            bool_tag = "tag:yaml.org,2002:bool"
            Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
                                              for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
            Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
            try:
                data = yaml.load(text, Loader=Loader)  # a SafeLoader
            except yaml.YAMLError as err:
                raise ValueError(" ".join(str(err).split())) from err
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(one_line(f"cannot read config file {path}: {' '.join(str(err).split())}")) from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return {str(k): v for k, v in data.items()}


def _token(value: Any) -> str:
    """A config scalar as the command-line text that would give it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # round-trips; nan and inf too (then rejected by the range check)
    return str(value)


def _config_argvs(name: str, value: Any, is_list: bool, optional: bool, path: str) -> list[list[str]] | None:
    """The command-line tokens of one config entry: one argv per list element (None: the value null)."""
    where = f"option {name} in config file {path}"
    if value is None:
        if not optional:
            raise UserError(f"{where}: null is not allowed (only for options whose default is None)")
        return None
    if isinstance(value, dict):
        raise UserError(f"{where}: expected {'a list' if is_list else 'a single value'}, got a mapping")
    if isinstance(value, (list, tuple)):
        if not is_list:
            raise UserError(f"{where}: expected a single value, got a list")
        items = list(value)
    else:
        items = [value]  # a scalar given for a list option: a one-element list
    argvs = []
    for item in items:
        if item is None or isinstance(item, (dict, list, tuple)):
            raise UserError(f"{where}: list elements must be single values, got {type(item).__name__}")
        try:
            argvs.append([f"--{name}={_token(item)}"])  # `=`: a value starting with '-' stays a value
        except ValueError as err:  # e.g. an integer too long to print
            raise UserError(f"{where}: {err}") from err
    if is_list and not argvs:
        argvs.append([f"--{name}"])  # an empty list
    return argvs


def _config_values(parser: argparse.ArgumentParser, cls: type, path: str) -> dict[str, Any]:
    """A config file's values, each converted by `parser` exactly as the same text given as a flag."""
    loaded = load_config(path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}  # `rank: 4` too
    twice = [alias for alias in loaded if alias in aliases and aliases[alias] in loaded]
    if twice:
        raise UserError(f"config file {path}: {twice[0]} and {aliases[twice[0]]} are one option: give one")
    loaded = {aliases.get(k, k): v for k, v in loaded.items()}
    unknown = sorted(set(loaded) - set(fields))
    if unknown:
        raise UserError(one_line(f"unknown option(s) in {path}: {', '.join(unknown)}"
                                 f"{not_taken_advice(unknown, getattr(cls, 'FLAGS_NOT_TAKEN', {}))}"))
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    parser.raise_errors = True  # type: ignore[attr-defined]
    try:
        for name, raw in loaded.items():
            _, is_list = _base_type(hints[name])
            argvs = _config_argvs(name, raw, is_list, _is_optional(hints[name]), path)
            if argvs is None:
                values[name] = None
                continue
            parsed = []
            for argv in argvs:
                try:
                    parsed.append(vars(parser.parse_args(argv))[name])
                except _ParseError as err:
                    raise UserError(f"{err} (option {name} in config file {path})") from None
            values[name] = [x for part in parsed for x in part] if is_list else parsed[0]
    finally:
        parser.raise_errors = False  # type: ignore[attr-defined]
    return values


def _config_position(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Index in `argv` of the last `--config` flag (`--config F`, `--config=F`, or an abbreviation argparse takes
    for it), the one argparse uses."""
    at = [i for i, token in enumerate(argv) if _is_config_flag(parser, token)]
    assert at, argv  # argparse found a --config
    return at[-1]


def _is_config_flag(parser: argparse.ArgumentParser, token: str) -> bool:
    """`token` is `--config`, `--config=F`, or an abbreviation that argparse takes for it."""
    name = token.split("=", 1)[0]
    options = [o for action in parser._actions for o in action.option_strings]
    return name == "--config" or (name.startswith("--c") and [o for o in options if o.startswith(name)] == ["--config"])


def parse_options(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` (default: sys.argv) into an instance of dataclass `cls`.

    Precedence: the last word on an option wins, the `--config` file's values standing where the flag is (argparse's
    rule for a file of arguments): a job script's own flags before a user's `--config` give way to it, a user's
    flags after it win; then field defaults. Config
    values go through the same parser as flags (a scalar for a list option is a
    one-element list, `null` only for Optional options), then every given value, from
    either source, is checked against its declared range (`option_problem`).
    Errors: argparse's one line and SystemExit(2) for bad flags; a one-line `UserError`
    (naming the file and option) for config values and for values out of range.
    """
    parser = build_parser(cls, description)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    values = vars(parser.parse_args(argv))  # every flag checked, --help answered
    config = values.pop("config", None)
    from_config: set[str] = set()
    if config and sum(_is_config_flag(parser, token) for token in argv) > 1:
        raise UserError("--config is given more than once: give one file (put what differs in flags after it)")
    if config:  # the file's values take its place in the command line: flags after it win over them, flags before not
        at = _config_position(parser, argv)
        before = vars(parser.parse_args(argv[:at]))
        after = vars(parser.parse_args(argv[at + (1 if "=" in argv[at] else 2):]))
        in_file = _config_values(parser, cls, config)
        from_config = set(in_file) - set(after)
        values = {**before, **in_file, **after}
        values.pop("config", None)
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if default_of(f) is dataclasses.MISSING and f.name not in values]
    # what the command line alone decides is the same on every rank: said once per node (a file is each node's read)
    error = UserError if config else UserError.on_every_rank
    if missing:
        raise error("missing required option(s): " + ", ".join(f"--{m}" for m in missing))
    for field in fields:
        if field.name in values:  # given values only: defaults are declared in range
            problem = option_problem(field, values[field.name])
            if problem:
                raise (UserError if field.name in from_config else error)(
                    problem + (f" (in config file {config})" if field.name in from_config else ""))
    return cls(**values)


CREATED_FOLDERS: list[Path] = []  # by `check_output_dir`, removed again while empty when the job ends in a UserError
LOCK_FILE = ".sketch2real.lock"  # `lock_output_dir`'s, in the folder it guards
HELD_LOCKS: dict[Path, int] = {}  # folder -> the descriptor holding its lock, for this process's run


def remove_empty_created_folders() -> None:
    """Remove the folders `check_output_dir` created that hold nothing but this job's lock (deepest first): bad input
    leaves none."""
    for folder in CREATED_FOLDERS:
        try:
            if [p.name for p in folder.iterdir()] == [LOCK_FILE] and folder.resolve() in HELD_LOCKS:
                (folder / LOCK_FILE).unlink()
            folder.rmdir()
        except OSError:  # written to (or another rank's already gone)
            pass
    CREATED_FOLDERS.clear()


def lock_output_dir(folder: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Hold an exclusive lock on `folder` until `release_output_locks` (at the script's end) or the process ends, a
    kill included: a second job given the same folder stops in one line, where both ran and mixed their outputs (one
    job's weights beside another's run_config.json; images of two settings in one index; a save deleting the other's
    checkpoint in progress). The main process only (a job's ranks share the folder). A file system without locks, or
    a lock file this user cannot open, leaves the folder unguarded, as before."""
    import fcntl
    import socket

    key = Path(folder).resolve()
    if key in HELD_LOCKS:  # this process's own (a script run twice in one process)
        return
    path = key / LOCK_FILE
    for _ in range(3):  # a job ending between our open and our lock unlinks the file we locked: take the new one
        try:  # 0o666: the umask decides, as for the other outputs (a group's shared folder)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # another user's, not writable to us: the lock alone
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise UserError(f"{flag} {folder} is in use by another job ({holder}): two jobs writing one folder mix "
                            f"their outputs; give this one another {flag}, or wait for that one to end (a job of a "
                            f"node that died holds it no longer: remove {path})") from None
        except OSError:  # no locks here (ENOLCK, EOPNOTSUPP; NFS's on a read-only descriptor)
            os.close(fd)
            return
        try:
            current = os.stat(path).st_ino
        except OSError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    else:
        return
    job = os.environ.get("SLURM_JOB_ID")
    with contextlib.suppress(OSError):  # read-only to us: held, unlabelled
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}{f', Slurm job {job}' if job else ''}".encode())
    HELD_LOCKS[key] = fd
    remove_killed_writers_leftovers(key)


# What a writer killed mid-write leaves, by the exact names the writers make (a folder given may hold others' files):
# a pipeline staged by `models.save_pretrained_atomic` (tempfile's 8 random characters), a checkpoint cut short, the
# temp files of `io.atomic_path` (mkstemp's) and of safetensors (Rust tempfile's 6)
LEFTOVER_FOLDERS = re.compile(r"\.pipeline-[a-z0-9_]{8}|checkpoint-\d+\.partial")
LEFTOVER_FILES = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")
# The subfolders they are left in, below the locked folder (a sequential run's stages hold the same again; images/ a
# folder per category); no other: a folder given may hold another job's running folder or a shared cache
LEFTOVER_PLACES = re.compile(r"without_ema|checkpoint-\d+|images|validation|stage-\d+-.+")


def remove_killed_writers_leftovers(folder: Path, depth: int = 3) -> None:
    """Remove, `depth` folders deep, what writers killed mid-write left in `folder` and its `LEFTOVER_PLACES`, once this
    job holds its lock (no writer of it is alive): a staged pipeline is most of a model, pushed to the hub beside it;
    a checkpoint's `.partial` is never resumed. Not in a subfolder another job holds (its lock file there), nor in any
    other folder (latent caches: `--latent_cache_dir` may share them with jobs writing now)."""
    import shutil

    def removed(path: Path) -> None:
        logging.getLogger("sketch2real").info("removed %s (left by a job killed while writing it)", path)

    for root, folders, files in os.walk(folder):
        here = Path(root)
        deep = len(here.relative_to(folder).parts) + 1 >= depth
        for name in list(folders):
            if LEFTOVER_FOLDERS.fullmatch(name):
                shutil.rmtree(here / name, ignore_errors=True)
                removed(here / name)
            ours = LEFTOVER_PLACES.fullmatch(name) or (here.name == "images" and not name.startswith("."))
            if deep or not ours or (here / name / LOCK_FILE).exists() or not (here / name).is_dir():
                folders.remove(name)
        for name in files:
            if LEFTOVER_FILES.fullmatch(name):
                with contextlib.suppress(OSError):
                    (here / name).unlink()
                    removed(here / name)


def release_output_locks() -> None:
    """Let go of the folders `lock_output_dir` holds (a script's end; run in-process, the next run takes them), and
    remove the lock files (a killed job's stays, free, until the next job in its folder ends)."""
    for folder, fd in HELD_LOCKS.items():
        with contextlib.suppress(OSError):
            (folder / LOCK_FILE).unlink()
        os.close(fd)
    HELD_LOCKS.clear()


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir", not_into: str | os.PathLike = "",
                     refuse_training_runs: bool = False) -> Path:
    """Create output folder `path` (parents too) and make sure files can be written in it; returns it.

    One-line `UserError`s: empty path; the path, or one of its parents, is a file; the folder
    cannot be created (permissions, read-only file system); or a file cannot be created in it. And, before anything
    is written there, the folder `not_into` (a training run's base model: a full fine-tune saved into it replaced its
    weights), or with `refuse_training_runs` a training run's folder (a generation, caption or FID job's metrics.json
    replaced the run's, which then trained again from its start when resumed).
    Writability is tested by creating and removing a temporary file, since permission bits
    do not stop root (and os.access says yes on a read-only mount).
    """
    if not str(path):
        raise UserError(f"{flag} is required")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    if not_into and out.exists() and Path(not_into).exists() and out.resolve() == Path(not_into).resolve():
        raise UserError(f"{flag} {path} is the base model's folder: its weights would be replaced; give another folder")
    if refuse_training_runs and (out / "run_config.json").is_file():
        raise UserError(f"{flag} {path} holds a training run (run_config.json): this job's metrics.json would replace "
                        "the run's; give another folder")
    missing = [folder for folder in (out, *out.parents) if not folder.exists()]  # the deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        CREATED_FOLDERS.extend(missing)
    except OSError as err:
        reason = "a parent is a file" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or err
        raise UserError(f"{flag} {path}: cannot create the folder ({reason})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag} {path} is not writable ({err.strerror or err})") from None
    return out


def leave_process_group() -> None:
    """Wait for every rank, then destroy the process group (where the script made one and left it).

    A rank that exits while another still works (rank 0 writing the report) leaves gloo's threads to interpreter
    shutdown, where they abort the process at random (SIGABRT, "terminate called without an active exception"),
    and the launcher then kills rank 0 before it has written anything.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int | str | None) -> typing.NoReturn:
    """End the process with `code` as `sys.exit(code)` would, after what an exit does for the script's data (non-daemon
    threads joined, atexit handlers run: logging, trackers, DataLoader workers; stdout and stderr flushed), but
    without the interpreter's finalization: tearing down torch's, diffusers' and transformers' objects took ~1.6 s of
    CPU per process after the script's last line (a tiny generation job: 9.0 s of CPU in all), on every rank of
    every job."""
    import atexit
    import threading

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    try:
        threading._shutdown()  # what the interpreter does first at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
                pass
        os._exit(code or 0)


def route_flags(argv: list[str], scripts: dict[str, type]) -> dict[str, list[str]]:
    """One job's command line split among the scripts it runs (`scripts`: name -> options class): each `--flag` (by
    its full name) with the values after it goes to every script whose options have it; one line for a flag that none
    has, naming what each takes."""
    taken = {name: {f"--{field.name}" for field in dataclasses.fields(cls)} for name, cls in scripts.items()}
    routed: dict[str, list[str]] = {name: [] for name in scripts}
    targets: list[str] = []
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            targets = [name for name, flags in taken.items() if flag in flags]
            if not targets:
                raise UserError(f"unknown option {flag}: " + "; ".join(f"{name} takes {' '.join(sorted(flags))}"
                                                                       for name, flags in taken.items()))
        elif not targets:
            raise UserError(f"{token!r} is not the value of an option")
        for name in targets:
            routed[name].append(token)
    return routed


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit
EXIT_FULL_DISK = 1  # not the user's input (2): the same command succeeds once there is room
# how writers that are not Python's file objects say so: safetensors (Rust: "os error 28"), torch.save's zip writer
FULL_DISK_WORDS = ("No space left", "Disk quota exceeded", "File too large", *(f"os error {e}" for e in FULL_DISK_ERRNOS),
                   "file write failed", "inline_container")


def is_full_disk(err: BaseException) -> bool:
    """Whether an exception says the disk (or quota, or file-size limit) was full while writing."""
    if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
        return True
    return any(word in str(err) for word in FULL_DISK_WORDS)


class _AboveProgressBars(logging.StreamHandler):
    """Log lines through `tqdm.write`: it clears the progress bar, writes the line and draws the bar again below (a
    warning written mid-bar landed on the bar's own line, in a terminal and in a Slurm log alike)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def log_to_stderr(level: int = logging.WARNING, fmt: str = "%(message)s") -> None:
    """The root logger's one handler: stderr, above any progress bar. The default is what Python prints with no
    handler at all (warnings and errors, their message alone); trainers log INFO on the main process. Handlers set
    otherwise (a test's capture, the user's own configuration) are left as they are."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _AboveProgressBars)]:
        root.removeHandler(handler)
    if not root.handlers:
        logging.basicConfig(format=fmt, level=level, handlers=[_AboveProgressBars(sys.stderr)])


def output_dir_of(script_args: list[str]) -> str:
    """The --output_dir among a script's arguments (the last one given wins, as argparse reads it), or ""."""
    found = ""
    for previous, arg in zip(["", *script_args], script_args):
        if arg.startswith("--output_dir="):
            found = arg.split("=", 1)[1]
        elif previous == "--output_dir":
            found = arg
    return found


def stopped_after_a_signal(err: BaseException) -> bool:
    """Whether a failure came after a preemption signal (Slurm's): the ranks that stopped on it first broke a
    collective this rank was in (a barrier after its share of latent caching, class images, generation). The rank
    then stops as preempted, leaving PREEMPTED in --output_dir for the job's requeue (its failure read as a crash
    failed a preempted job). A failure before any signal is the job's own: no requeue would mend it."""
    from sketch2real.training.preemption import preemption, write_preempted

    output_dir = output_dir_of(sys.argv[1:])
    if not preemption or not output_dir:
        return False
    write_preempted(output_dir, f"stopped on signal {preemption.raised}, then: {one_line(str(err))}")
    return True


def _program() -> str:
    """The script's name, as its one-line errors start."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sketch2real"


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point: a `UserError` becomes one stderr line and exit status 2; after a normal return every rank
    leaves the process group together (`leave_process_group`). A script's own `main` (run as `__main__`) then ends its
    process by `exit_now`; any other callable gets the `SystemExit`."""
    if not logging.getLogger().handlers:
        log_to_stderr()
    # transformers >= 5.25 swaps model layers for kernels it downloads from the Hub by default (code fetched at run
    # time, numbers not those tested, a text store keyed as if the same): on only where a user sets it
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    try:
        try:
            result = main()
            if result in (0, None):
                leave_process_group()
        except UserError as err:
            remove_empty_created_folders()
            prog = _program()
            if not (err.same_on_every_rank and on_other_rank()):
                print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as err:
            if not is_full_disk(err) and stopped_after_a_signal(err):
                from sketch2real.training.preemption import PREEMPTED_EXIT_CODE

                prog = _program()
                print(f"{prog}: stopped on a preemption signal ({type(err).__name__} after it: {one_line(str(err))})",
                      file=sys.stderr)
                sys.exit(PREEMPTED_EXIT_CODE)
            if not is_full_disk(err):
                raise
            prog = _program()
            where = f" writing {err.filename}" if isinstance(err, OSError) and err.filename else ""
            what = err.strerror if isinstance(err, OSError) and err.strerror else one_line(str(err))
            print(f"{prog}: error: {what}{where}: free space (or raise the quota) and rerun", file=sys.stderr)
            sys.exit(EXIT_FULL_DISK)
        sys.exit(result if isinstance(result, int) else 0)
    except SystemExit as stop:
        release_output_locks()
        if getattr(main, "__module__", None) != "__main__":
            raise
        exit_now(stop.code)
    except BaseException:  # a crash: the traceback, the folder free for the next run in this process
        release_output_locks()
        raise


def as_dict(options: Any) -> dict[str, Any]:
    """A dataclass of options as a JSON-safe dict, with secrets (tokens, keys) left out."""
    data = dataclasses.asdict(options)
    return {k: v for k, v in data.items() if not any(s in k.lower() for s in ("token_value", "api_key", "hub_token"))}
