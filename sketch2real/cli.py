"""Options as dataclasses, flags named as in diffusers' examples, and one-line errors.

Every entry script declares a dataclass of options; `parse_options` turns it into
an argparse parser (help text from field metadata), lets `--config FILE`
(YAML or JSON) set the same fields, and `run_main` turns a `UserError` into one
line on stderr and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text; lists get `default_factory` automatically."""
    meta = {"help": help}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) for a field annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if args and origin is not None:  # Optional / Union
        return _base_type(args[0])
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` flag per field of dataclass `cls`."""
    parser = _Parser(
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file setting any of these options")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        scalar, is_list = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if scalar is bool and not is_list:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs["type"] = scalar if scalar in (int, float, str) else str
            if is_list:
                kwargs["nargs"] = "+"
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs["help"] += " (required)"
        else:
            kwargs["help"] += f" [default: {default}]"
        parser.add_argument(f"--{field.name}", **kwargs)
    return parser


def _load_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return data


def parse_options(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` (default: sys.argv) into an instance of dataclass `cls`.

    Precedence: command-line flags, then `--config` file, then field defaults.
    """
    parser = build_parser(cls, description)
    namespace = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config = namespace.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    if config:
        loaded = _load_config(config)
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise UserError(f"unknown option(s) in {config}: {', '.join(unknown)}")
        values.update(loaded)
    values.update(namespace)
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        raise UserError("missing required option(s): " + ", ".join(f"--{m}" for m in missing))
    return cls(**values)


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point: a `UserError` becomes one stderr line and exit status 2."""
    try:
        result = main()
    except UserError as err:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sketch2real"
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def as_dict(options: Any) -> dict[str, Any]:
    """A dataclass of options as a JSON-safe dict, with secrets (tokens, keys) left out."""
    data = dataclasses.asdict(options)
    return {k: v for k, v in data.items() if not any(s in k.lower() for s in ("token_value", "api_key", "hub_token"))}
