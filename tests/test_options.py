"""Options of every script: config files parsed exactly like flags, declared ranges and choices, one-line errors,
usable output folders. Fast and in-process: no model is loaded."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import typing
from functools import cache
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sketch2real.cli import (
    RANGE_KEYS,
    UserError,
    _base_type,
    _is_optional,
    build_parser,
    check_option_values,
    check_output_dir,
    option_problem,
    parse_options,
    run_main,
)

from .helpers import import_script

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("infer/caption.py", "infer/generate.py", "eval/fid.py", "data_prep/build_splits.py", "data_prep/make_shards.py",
           "data_prep/make_synthetic_sketchy.py")
CLASSES = ("TrainOptions", "DreamBoothOptions", "TextualInversionOptions", "SequentialOptions", "ControlNetOptions",
           "tiny", *SCRIPTS)


@cache
def options_class(key: str) -> type:
    if key in SCRIPTS:
        return import_script(key).Options
    if key == "tiny":
        from sketch2real.testing.build import Options

        return Options
    from sketch2real.training import controlnet, dreambooth, options, sequential, textual_inversion

    return {"TrainOptions": options.TrainOptions, "DreamBoothOptions": dreambooth.DreamBoothOptions,
            "TextualInversionOptions": textual_inversion.TextualInversionOptions,
            "SequentialOptions": sequential.SequentialOptions, "ControlNetOptions": controlnet.ControlNetOptions}[key]


@cache
def _field_kinds(cls: type) -> dict[str, tuple[dataclasses.Field, type, bool, bool]]:
    """name -> (field, scalar type, is_list, is_optional)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, *_base_type(hints[f.name]), _is_optional(hints[f.name])) for f in dataclasses.fields(cls)}


def _required_argv(cls: type, skip: str = "") -> list[str]:
    """Flags giving every option without a default (all of them strings) a value, except `skip`."""
    argv = []
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != skip:
            argv += [f"--{f.name}", "placeholder"]
    return argv


def _text(value) -> str:
    """A value as a user types it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _argv_tokens(value) -> list[str]:
    if isinstance(value, list):
        return [_text(v) for v in value]
    return [_text(value)]


@dataclasses.dataclass
class Outcome:
    value: typing.Any = None
    error: str | None = None  # one-line message (argparse's stderr or the UserError)
    kind: str = ""  # "exit" (SystemExit 2) or "user" (UserError)


def _parse(cls: type, argv: list[str], name: str) -> Outcome:
    """Parse; any exception other than SystemExit(2) or UserError fails the test (it propagates)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            opts = parse_options(cls, argv)
    except SystemExit as stop:
        assert stop.code == 2, (argv, stop.code, stderr.getvalue())
        lines = stderr.getvalue().splitlines()
        assert len(lines) == 1, (argv, stderr.getvalue())
        return Outcome(error=lines[0], kind="exit")
    except UserError as err:
        assert len(str(err).splitlines()) == 1, (argv, str(err))
        return Outcome(error=str(err), kind="user")
    return Outcome(value=getattr(opts, name))


def _via_argv(cls: type, name: str, value) -> Outcome:
    return _parse(cls, [*_required_argv(cls), f"--{name}", *_argv_tokens(value)], name)


def _via_config(cls: type, name: str, value, folder: Path, fmt: str = "json") -> tuple[Outcome, Path]:
    file = folder / f"options.{fmt}"
    data = {name: value}
    file.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    return _parse(cls, [*_required_argv(cls, skip=name), "--config", str(file)], name), file


def _assert_well_typed(cls: type, name: str, outcome: Outcome) -> None:
    """A parsed value has the field's type and lies in its declared range."""
    field, scalar, is_list, optional = _field_kinds(cls)[name]
    value = outcome.value
    if value is None:
        assert optional, (name, value)
        return
    items = value if is_list else [value]
    assert isinstance(value, list) == is_list, (name, value)
    assert all(type(v) is scalar for v in items), (name, value)
    assert option_problem(field, value) is None, (name, value)


def _check_config_outcome(cls: type, name: str, outcome: Outcome, file: Path) -> None:
    if outcome.error is None:
        _assert_well_typed(cls, name, outcome)
    else:  # a config file's mistakes name the file and the option, in one line
        assert outcome.kind == "user", outcome
        assert name in outcome.error and str(file) in outcome.error, outcome.error


def _check_argv_outcome(cls: type, name: str, outcome: Outcome) -> None:
    if outcome.error is None:
        _assert_well_typed(cls, name, outcome)
    elif outcome.kind == "user":  # parsed, but outside the declared range
        assert f"--{name}" in outcome.error, outcome.error


@pytest.fixture(scope="module", autouse=True)
def _one_parser_per_class():
    """Thousands of parses below: build each class's parser once (`build_parser` is a pure function of the class;
    `parse_options` still uses the one parser for flags and config values)."""
    import sketch2real.cli as cli

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "build_parser", cache(cli.build_parser))
        yield


# --- (a) config values behave as flags ---------------------------------------------------------------------------


def _db():
    return options_class("DreamBoothOptions")


@pytest.mark.parametrize("trainer, default", [("DreamBoothOptions", 5e-6), ("TextualInversionOptions", 5e-4),
                                               ("ControlNetOptions", 1e-5)])
def test_prodigy_without_a_learning_rate_gets_its_own_in_every_trainer(trainer, default):
    """--optimizer prodigy alone: 1.0, which Prodigy's estimate is scaled by (TI and ControlNet refused their own
    default before); each trainer's own default otherwise, and a given rate is kept."""
    needed = ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--shard_dir", "s"]
    needed += ["--instance_prompt", "p", "--instance_category", "cat"] if trainer == "DreamBoothOptions" else []
    prodigy = parse_options(options_class(trainer), [*needed, "--optimizer", "prodigy"])
    prodigy.check()
    assert prodigy.learning_rate == 1.0
    assert parse_options(options_class(trainer), needed).learning_rate == default
    assert parse_options(options_class(trainer), [*needed, "--learning_rate", "0.5", "--optimizer", "prodigy"]).learning_rate == 0.5
    # the model card's settings: a default resolved from other options is no change (every card listed the rate)
    from sketch2real.training.model_card import changed_options

    assert "learning_rate" not in changed_options(parse_options(options_class(trainer), needed))
    assert changed_options(parse_options(options_class(trainer), [*needed, "--learning_rate", "0.5"]))["learning_rate"] == 0.5


def test_a_lora_run_into_a_folder_holding_a_full_pipeline_is_refused(tmp_path):
    """Generation loads a folder's model_index.json first: a LoRA saved beside an earlier full fine-tune would never
    be used."""
    (tmp_path / "model_index.json").write_text("{}")
    args = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--instance_category", "cat",
            "--shard_dir", "s", "--output_dir", str(tmp_path)]
    parse_options(_db(), args).check()  # a full fine-tune may overwrite it
    with pytest.raises(UserError, match="holds a full pipeline .* generation would load it, not the LoRA"):
        parse_options(_db(), [*args, "--lora_rank", "4"]).check()


def test_a_resume_may_change_how_the_lora_file_is_written_not_what_is_trained():
    from sketch2real.training.checkpoints import run_fingerprint

    base = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--lora_rank", "4"]
    fingerprint = run_fingerprint(parse_options(_db(), base), 1)
    assert run_fingerprint(parse_options(_db(), [*base, "--lora_format", "comfyui"]), 1) == fingerprint
    assert run_fingerprint(parse_options(_db(), [*base, "--lora_alpha", "8"]), 1) != fingerprint


def test_config_values_are_converted_like_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text('use_8bit_adam: "false"\ncache_latents: "false"\nscale_lr: "yes"\nvalidation_prompt: a cat\n'
                      "learning_rate: 1e-4\ncheckpoints_total_limit: null\ninstance_prompt: -x sketch\nmixed_precision: no\n"
                      "allow_tf32: on\n")
    opts = parse_options(_db(), ["--config", str(config)])
    assert opts.use_8bit_adam is False and opts.cache_latents is False and opts.scale_lr is True and opts.allow_tf32 is True
    assert opts.mixed_precision == "no"  # YAML 1.1 would read `no` as false
    assert opts.validation_prompt == ["a cat"]  # a scalar for a list option: one element, not five letters
    assert opts.learning_rate == 1e-4 and isinstance(opts.learning_rate, float)  # YAML reads 1e-4 as a string
    assert opts.checkpoints_total_limit is None and opts.instance_prompt == "-x sketch"
    flags = parse_options(_db(), ["--use_8bit_adam", "false", "--cache_latents", "false", "--scale_lr", "yes",
                                  "--validation_prompt", "a cat", "--learning_rate", "1e-4", "--instance_prompt=-x sketch",
                                  "--mixed_precision", "no", "--allow_tf32", "on"])
    assert {k: v for k, v in dataclasses.asdict(flags).items() if k != "checkpoints_total_limit"} == \
           {k: v for k, v in dataclasses.asdict(opts).items() if k != "checkpoints_total_limit"}


def test_a_config_takes_an_option_s_alias_as_its_flag_does(tmp_path):
    """`rank: 4` in a config file is --lora_rank, as `--rank 4` is (diffusers' name; it was an unknown option there);
    the alias and the name both given are one line."""
    config = tmp_path / "run.yaml"
    config.write_text("rank: 4\n")
    assert parse_options(_db(), ["--config", str(config)]).lora_rank == 4 == parse_options(_db(), ["--rank", "4"]).lora_rank
    config.write_text("rank: 4\nlora_rank: 8\n")
    with pytest.raises(UserError, match="rank and lora_rank are one option: give one"):
        parse_options(_db(), ["--config", str(config)])


def test_command_line_flags_override_the_config(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"max_train_steps": 3, "validation_prompt": ["a", "b"], "cache_latents": False}))
    opts = parse_options(_db(), ["--config", str(config), "--max_train_steps", "5", "--cache_latents"])
    assert opts.max_train_steps == 5 and opts.validation_prompt == ["a", "b"] and opts.cache_latents is True
    assert parse_options(_db(), ["--validation_prompt", "a", "b"]).validation_prompt == ["a", "b"]


def test_a_job_script_s_flags_before_the_user_s_config_give_way_to_it(tmp_path):
    """slurm/*.sh pass their defaults (--max_train_steps "$STEPS", ...) before the user's `--config` (CONFIGS, or
    flags after the script): the file's values stand where --config is, as argparse reads a file of arguments, so
    the config's max_train_steps counts (it was overridden by the script's 400) and a flag after it still wins."""
    config = tmp_path / "dreambooth.yaml"
    config.write_text("max_train_steps: 1000\nmixed_precision: fp16\n")
    script = ["--max_train_steps", "400", "--mixed_precision", "bf16", "--seed", "3"]
    for form in (["--config", str(config)], [f"--config={config}"], ["--conf", str(config)]):
        opts = parse_options(_db(), [*script, *form])
        assert (opts.max_train_steps, opts.mixed_precision, opts.seed) == (1000, "fp16", 3), form
        assert parse_options(_db(), [*script, *form, "--max_train_steps", "7"]).max_train_steps == 7
    with pytest.raises(UserError, match="more than once"):  # which one counts would be a guess: refused
        parse_options(_db(), ["--config", str(config), "--max_train_steps", "5", "--config", str(config)])
    with pytest.raises(UserError, match="in config file"):  # a bad value still names the file, wherever it stands
        config.write_text("max_train_steps: 0\n")
        parse_options(_db(), [*script, "--config", str(config)])


def test_every_script_leaves_transformers_hub_kernels_off_unless_the_user_turns_them_on(monkeypatch):
    """transformers 5.25 replaces layers of the text encoders and captioners with kernels downloaded from the Hub
    unless USE_HUB_KERNELS says no: code fetched at run time on a GPU node with network, results unlike the tested."""
    import os

    seen = []
    monkeypatch.setenv("USE_HUB_KERNELS", "")
    monkeypatch.delenv("USE_HUB_KERNELS")  # restored to absent afterwards
    for set_by_user in (None, "YES"):
        if set_by_user:
            monkeypatch.setenv("USE_HUB_KERNELS", set_by_user)
        with pytest.raises(SystemExit):
            run_main(lambda: seen.append(os.environ["USE_HUB_KERNELS"]))
    assert seen == ["NO", "YES"]


def test_bad_config_value_exits_2_with_one_line_naming_option_and_file(tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.yaml"
    config.write_text('max_train_steps: "two"\n')
    monkeypatch.setattr(sys, "argv", ["dreambooth.py", "--config", str(config)])
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: parse_options(_db()))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "max_train_steps" in lines[0] and str(config) in lines[0] and "'two'" in lines[0], lines


@pytest.mark.parametrize("content, words", [
    ("resolution: {a: 1}\n", ["resolution", "mapping"]),
    ("resolution: [64, 128]\n", ["resolution", "a list"]),
    ("use_8bit_adam: [true]\n", ["use_8bit_adam", "a list"]),
    ("train_batch_size: null\n", ["train_batch_size", "null"]),
    ("validation_prompt: [a, [b]]\n", ["validation_prompt"]),
    ("validation_prompt: {a: b}\n", ["validation_prompt", "mapping"]),
    ("use_8bit_adam: maybe\n", ["use_8bit_adam", "'maybe'"]),
    ("checkpointing_steps: -1\n", ["--checkpointing_steps", "at least 0"]),
    ("learning_rate: .nan\n", ["--learning_rate", "finite"]),
    ("lr_scheduler: bogus\n", ["--lr_scheduler", "'bogus'"]),
    ("no_such_option: 1\n", ["no_such_option"]),
    ('"two\\nlines": 1\n', ["two\\nlines"]),
    ("resolution: [unclosed\n", ["cannot read"]),
    ("- just\n- a list\n", ["mapping"]),
])
def test_config_mistakes_are_one_line_user_errors(tmp_path, content, words):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    with pytest.raises(UserError) as err:
        parse_options(_db(), ["--config", str(config)])
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(config) in message and all(w in message for w in words), message


TRAINERS = ("DreamBoothOptions", "TextualInversionOptions", "SequentialOptions", "ControlNetOptions")


@pytest.mark.parametrize("key", TRAINERS)
def test_a_diffusers_flag_not_taken_says_what_to_give_and_the_flag_it_names_exists(key, tmp_path):
    """Every flag of diffusers' scripts that a trainer refuses says, in argparse's one line and for a config file's
    unknown option alike, what to give instead; each flag that advice names is one this trainer takes."""
    cls = options_class(key)
    table = cls.FLAGS_NOT_TAKEN
    taken = {f.name for f in dataclasses.fields(cls)} | {a for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    assert "num_train_epochs" in table and not set(table) & taken  # a taken flag's advice would never be read
    for name, advice in table.items():
        named = set(re.findall(r"--(\w+)", advice))
        assert named <= taken, (name, named - taken)
        for argv in ([f"--{name}", "3"], [f"--{name}=x"]):
            outcome = _parse(cls, argv, "seed")
            assert outcome.kind == "exit" and outcome.error.endswith(f"for --{name}: {advice}"), outcome
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"{name}: 3\n")
        outcome = _parse(cls, ["--config", str(config)], "seed")
        assert outcome.kind == "user" and f"for --{name}: {advice}" in outcome.error, outcome
    folder = {"DreamBoothOptions": "--instance_data_dir", "SequentialOptions": "--instance_data_dir",
              "TextualInversionOptions": "--train_data_dir"}.get(key)
    assert (f"own images: {folder} FOLDER" in table["dataset_name"]) if folder else ("own images" not in table["dataset_name"])
    unknown = _parse(cls, ["--no_such_flag", "1"], "seed")
    assert unknown.error.endswith("unrecognized arguments: --no_such_flag 1"), unknown  # nothing made up


# --- ranges and choices: declared for every numeric option, checked for flags and config alike --------------------


def test_every_script_is_covered():
    """Every entry script's options class is in CLASSES (so the properties below cover it)."""
    found = {str(p.relative_to(REPO)) for d in ("infer", "eval", "data_prep") for p in (REPO / d).glob("*.py")
             if "parse_options(" in p.read_text()}
    assert found == {*SCRIPTS, "data_prep/prepare.py"}  # prepare.py parses with its two steps' classes, covered here
    trainers = {p.name for p in (REPO / "train").glob("*.py") if "parse_options(" in p.read_text()}
    assert trainers == {"dreambooth.py", "dreambooth_sequential.py", "textual_inversion.py", "controlnet.py"}


def test_every_import_of_the_library_names_something_it_has_even_inside_a_function():
    """An import inside a function fails only when its path runs: prior preservation's class-image count imported a
    name moved to another module, and every --with_prior_preservation run stopped in a traceback."""
    import ast
    import importlib

    wrong = []
    for file in sorted(REPO.glob("[!.]*/**/*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sketch2real"):
                module = importlib.import_module(node.module)
                wrong += [f"{file.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}" for alias in node.names
                          if not hasattr(module, alias.name) and not (  # a submodule of a package, not yet imported
                              hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}"))]
    assert not wrong


@pytest.mark.parametrize("key", CLASSES)
def test_every_numeric_option_declares_a_range_and_defaults_lie_in_it(key):
    cls = options_class(key)
    for name, (field, scalar, _, _) in _field_kinds(cls).items():
        if scalar in (int, float):
            assert any(k in field.metadata for k in RANGE_KEYS), f"{key}: --{name} has no range"
    check_option_values(cls(**{f.name: "placeholder" for f in dataclasses.fields(cls)
                               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}))


def _out_of_range(field: dataclasses.Field, scalar: type) -> list:
    """Values of the right type that the field's declared range rejects."""
    meta, bad = field.metadata, []
    if "choices" in meta:
        bad.append("not-a-choice" if scalar is str else max(meta["choices"]) + 1)
    if "min" in meta:
        bad.append(meta["min"] - (1 if scalar is int else 0.5))
    if "min_exclusive" in meta:
        bad.append(scalar(meta["min_exclusive"]))
    if "max" in meta:
        bad.append(meta["max"] + 1)
    if "max_exclusive" in meta:
        bad.append(scalar(meta["max_exclusive"]))
    if "multiple_of" in meta:
        bad.append(max(meta.get("min", 0), meta["multiple_of"]) + 1)
    if scalar is float and any(k in meta for k in ("min", "min_exclusive", "max", "max_exclusive")):
        bad += [math.nan, math.inf]
    return bad


@pytest.mark.parametrize("key", CLASSES)
def test_out_of_range_values_are_rejected_naming_the_option(key, tmp_path):
    cls = options_class(key)
    checked = 0
    for name, (field, scalar, is_list, _) in _field_kinds(cls).items():
        for value in _out_of_range(field, scalar):
            given = [value] if is_list else value
            by_flag = _via_argv(cls, name, given)
            by_config, file = _via_config(cls, name, given, tmp_path)
            assert by_flag.kind == "user" and f"--{name}" in by_flag.error, (name, value, by_flag)
            assert by_config.kind == "user" and f"--{name}" in by_config.error and str(file) in by_config.error, by_config
            checked += 1
    assert checked or key == "tiny" or not any(s in (int, float) for _, s, _, _ in _field_kinds(cls).values())


HOSTILE = ["", "garbage", "--x", "nan", "-1", "１２", "9" * 5000, "line\nbreak", {"a": 1}, [1, "b\x0cc"], [], [None], None,
           math.nan, -math.inf, -1, 10**30, -0.5, True]


@pytest.mark.parametrize("key", CLASSES)
def test_every_option_survives_hostile_values(key, tmp_path):
    """Each option x each hostile value, as a flag and in a (JSON or YAML) config: parsed and well typed, or one line.
    Options inherited unchanged from another class in CLASSES are swept there."""
    cls = options_class(key)
    inherited = {id(f) for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    for name, (field, *_) in _field_kinds(cls).items():
        if id(field) in inherited:
            continue
        for i, value in enumerate(HOSTILE):
            _check_argv_outcome(cls, name, _via_argv(cls, name, value))
            outcome, file = _via_config(cls, name, value, tmp_path, "json" if i % 2 else "yaml")
            _check_config_outcome(cls, name, outcome, file)


_scalars = st.one_of(
    st.text(max_size=12), st.integers(min_value=-10**20, max_value=10**20), st.floats(), st.booleans(), st.none(),
    st.sampled_from(["nan", "inf", "-inf", "0", "-0", "1_000", " 7 ", "true", "off", "", "--x", "-1.5", "1e-3", "８"]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=4), _scalars, max_size=2))
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("key", CLASSES)
@PROPERTY
@given(data=st.data(), value=_values, fmt=st.sampled_from(["json", "yaml"]))
def test_property_any_value_parses_or_fails_in_one_line(key, tmp_path, data, value, fmt):
    cls = options_class(key)
    name = data.draw(st.sampled_from(sorted(_field_kinds(cls))), label="option")
    _check_argv_outcome(cls, name, _via_argv(cls, name, value))
    outcome, file = _via_config(cls, name, value, tmp_path, fmt)
    _check_config_outcome(cls, name, outcome, file)


def _argv_safe(token: str) -> bool:
    """argparse reads a token starting with '-' as a flag unless it looks like a negative number."""
    return not token.startswith("-") or re.fullmatch(r"-\d+|-\d*\.\d+", token) is not None


_typed = st.one_of(st.text(max_size=10), st.integers(min_value=-10**12, max_value=10**12), st.floats(allow_nan=False),
                   st.booleans(), st.sampled_from(["yes", "0", "1.5", "64", "sketch", "cosine", "fp16", ""]))


@pytest.mark.parametrize("key", CLASSES)
@PROPERTY
@given(data=st.data())
def test_property_config_gives_what_the_same_flags_give(key, tmp_path, data):
    """A value typed as a flag and written in a config file: the same option value, or both rejected."""
    cls = options_class(key)
    name = data.draw(st.sampled_from(sorted(_field_kinds(cls))), label="option")
    _, _, is_list, _ = _field_kinds(cls)[name]
    value = data.draw(st.lists(_typed, max_size=3) if is_list else _typed, label="value")
    assume(all(_argv_safe(t) for t in _argv_tokens(value)))
    by_flag = _via_argv(cls, name, value)
    by_config, _ = _via_config(cls, name, value, tmp_path, data.draw(st.sampled_from(["json", "yaml"])))
    assert (by_flag.error is None) == (by_config.error is None), (name, value, by_flag, by_config)
    assert by_flag.value == by_config.value, (name, value, by_flag, by_config)


def test_cross_option_checks_stay_in_check():
    """get_scheduler's polynomial schedule decays to 1e-7 and raises ValueError for a learning rate at or below it."""
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--lr_scheduler", "polynomial"]
    with pytest.raises(UserError, match="--learning_rate must be larger"):
        parse_options(options_class("TrainOptions"), [*base, "--learning_rate", "1e-8"]).check()
    parse_options(options_class("TrainOptions"), [*base, "--learning_rate", "1e-6"]).check()


# --- (c) --help shows the ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, expected", [
    ("DreamBoothOptions", ["SD3 and FLUX take a multiple of 16 [default: None; >= 8, multiple of 8]",
                           "with --lora_rank 5e-4 (SD 1.x/2.x) or 1e-4", "--lora_rank LORA_RANK, --rank LORA_RANK", "[default: 500; >= 0]", "AdamW beta2 [default: 0.999; in [0, 1)]",
                           "one of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup",
                           "[default: tensorboard; one of tensorboard, wandb, all, none]"]),
    ("infer/generate.py", ["(SD 1.5 512, SDXL/SD3/FLUX 1024); SD3 and FLUX take a multiple of 16 [default: None; >= 8, multiple of 8]", "denoising steps [default: 50; >= 1]",
                           "one of '', pndm, ddim, dpm++, euler, euler_a, unipc", "FLUX.1 3.5; FLUX.2 [klein] 4.0) [default: None; >= 0]"]),
    ("eval/fid.py", ["[default: 2048; one of 64, 192, 768, 2048]", "[default: ['fid', 'kid']; any of fid, kid"]),
    ("data_prep/build_splits.py", ["[default: 0.1; in [0, 1)]", "any of error, ambiguous, pose, context"]),
])
def test_help_shows_ranges_and_choices(key, expected):
    text = " ".join(build_parser(options_class(key)).format_help().split())
    for piece in expected:
        assert piece in text, piece


# --- (d) output folders --------------------------------------------------------------------------------------------


def test_output_dir_is_created_with_its_parents(tmp_path):
    assert check_output_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())  # the probe file is gone


@pytest.mark.parametrize("where, words", [("file", "exists and is not a folder"), ("file/sub", "cannot create the folder"),
                                          ("", "is required")])
def test_unusable_output_dir_is_one_line(tmp_path, where, words):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as err:
        check_output_dir(str(tmp_path / where) if where else "", "--out")
    assert len(str(err.value).splitlines()) == 1 and words in str(err.value) and "--out" in str(err.value), str(err.value)


def test_unwritable_output_dir_is_one_line(tmp_path, monkeypatch):
    """Root writes through permission bits, so the write probe is made to fail as on a read-only mount."""
    import sketch2real.cli as cli

    def refuse(**kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=r"^--output_dir .* is not writable \(Read-only file system\)$"):
        check_output_dir(str(tmp_path / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_output_dir_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(UserError, match="is not writable"):
        check_output_dir(str(folder))


@pytest.mark.parametrize("rel, extra", [("data_prep/make_synthetic_sketchy.py", []),
                                        ("data_prep/make_shards.py", ["--splits_dir", "s", "--sketchy_root", "r"])])
def test_script_with_a_file_as_output_dir_exits_2_in_one_line(tmp_path, monkeypatch, capsys, rel, extra):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sys, "argv", [rel, *extra, "--output_dir", str(tmp_path / "file")])
    with pytest.raises(SystemExit) as stop:
        run_main(import_script(rel).main)
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "--output_dir" in lines[0] and "not a folder" in lines[0], lines


def test_taking_a_folder_removes_only_what_its_own_killed_writers_left(tmp_path):
    """The lock's taker removes a staged pipeline, a cut checkpoint and atomic writers' temp files in the folder and the
    subfolders its writers use; not in a subfolder another job holds (`fid.py --output_dir runs` while runs/db trains:
    its checkpoint in progress was deleted), nor in any other (a shared latent cache's block being written)."""
    from sketch2real.cli import LOCK_FILE, lock_output_dir, release_output_locks

    ours = [tmp_path / "checkpoint-3.partial" / "model.safetensors", tmp_path / ".pipeline-ab12cd34" / "unet" / "w",
            tmp_path / "images" / "cat" / ".n02121808_1-1.png.x1y2z3w4.tmp", tmp_path / "without_ema" / ".tmpA1b2C3"]
    theirs = [tmp_path / "db" / LOCK_FILE, tmp_path / "db" / "checkpoint-4.partial" / "model.safetensors",
              tmp_path / "cache" / "key" / ".block-000001.npy.a1b2c3d4.tmp", tmp_path / ".config" / ".tmpA1b2C3"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    try:
        lock_output_dir(tmp_path)
    finally:
        release_output_locks()
    assert not any(path.exists() for path in ours) and not (tmp_path / "checkpoint-3.partial").exists()
    assert all(path.exists() for path in theirs)


@pytest.mark.parametrize("rel, args", [
    ("train/dreambooth.py", ["--pretrained_model_name_or_path", "no/such-model", "--shard_dir", "s", "--mixed_precision", "no"]),
    ("infer/generate.py", ["--pretrained_model_name_or_path", "m", "--shard_dir", "no-shards", "--prompt_template", "a {category}"]),
])
def test_bad_input_leaves_no_empty_output_dir_and_keeps_one_that_was_there_or_was_written(rel, args, tmp_path, monkeypatch,
                                                                                         capsys):
    """The folder is made (and its writability tried) before the slow parts; the user's mistake left it, empty."""
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def fail(output_dir):
        monkeypatch.setattr(sys, "argv", [rel, *args, "--output_dir", str(output_dir)])
        with pytest.raises(SystemExit) as stop:
            run_main(import_script(rel).main)
        assert stop.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1

    fail(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    fail(tmp_path / "there" / "run")
    assert (tmp_path / "there").is_dir() and not (tmp_path / "there" / "run").exists()
    (tmp_path / "kept").mkdir()
    fail(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


def test_a_second_job_given_a_folder_in_use_stops_in_one_line_and_the_folder_is_free_when_the_first_ends(
        tmp_path, monkeypatch, capsys):
    """Two jobs into one --output_dir (a sweep of `sbatch slurm/dreambooth.sh --learning_rate ...`, each the same
    default folder) both ran: one's weights beside the other's run_config.json, images of two settings in one index,
    a save deleting the other's checkpoint in progress."""
    from sketch2real.cli import LOCK_FILE, lock_output_dir
    from sketch2real.training.accelerator import make_accelerator

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from sketch2real.cli import lock_output_dir; "
                               f"lock_output_dir({str(folder)!r}); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "SLURM_JOB_ID": "4242"})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"--output_dir {folder} is in use by another job \(pid {holder.pid} on .*, "
                                            r"Slurm job 4242\): two jobs writing one folder"):
            lock_output_dir(folder)
        opts = parse_options(_db(), ["--pretrained_model_name_or_path", "m", "--output_dir", str(folder),
                                     "--shard_dir", "s", "--mixed_precision", "no"])
        with pytest.raises(UserError, match="is in use by another job"):
            make_accelerator(opts)  # a trainer: before any model loads
        monkeypatch.setattr(sys, "argv", ["infer/generate.py", "--pretrained_model_name_or_path", "m", "--prompts", "a cat",
                                          "--output_dir", str(folder)])
        with pytest.raises(SystemExit) as stop:
            run_main(import_script("infer/generate.py").main)
        assert stop.value.code == 2 and "is in use by another job" in capsys.readouterr().err
    finally:
        holder.communicate("")  # the first job ends (a kill frees it too: the lock is the process's)
    make_accelerator(opts)  # free now
    from sketch2real.cli import release_output_locks

    assert (folder / LOCK_FILE).is_file()
    release_output_locks()  # the script's end
    assert not (folder / LOCK_FILE).exists()

    # A job ending between another's open and its lock unlinked the file that one then locked: a third job created
    # a new one and both ran. The lock is taken on the file that is there.
    import fcntl

    holder = subprocess.Popen([sys.executable, "-c", "import sys; from sketch2real.cli import lock_output_dir, "
                               f"release_output_locks; lock_output_dir({str(folder)!r}); print('held', flush=True); "
                               "sys.stdin.readline(); release_output_locks()"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    flock, calls = fcntl.flock, []

    def the_holder_ends_first(fd, operation):
        if not calls:
            holder.communicate("\n")
        calls.append(fd)
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", the_holder_ends_first)
    lock_output_dir(folder)
    monkeypatch.setattr(fcntl, "flock", flock)
    third = subprocess.run([sys.executable, "-c", f"from sketch2real.cli import lock_output_dir; lock_output_dir({str(folder)!r})"],
                           capture_output=True, text=True)
    assert len(calls) == 2 and "is in use by another job" in third.stderr
    release_output_locks()


def test_trainers_check_the_output_dir_before_anything_else(tmp_path, monkeypatch):
    from sketch2real.training.accelerator import make_accelerator

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    (tmp_path / "file").write_text("x")
    opts = parse_options(_db(), ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "file" / "run"),
                                 "--shard_dir", "s", "--mixed_precision", "no"])
    with pytest.raises(UserError, match="--output_dir .*cannot create the folder"):
        make_accelerator(opts)


@pytest.mark.parametrize("key", CLASSES)
def test_options_are_frozen_after_parsing(key):
    """Derived values (the precision used, the scaled learning rate) are returned, never written back."""
    cls = options_class(key)
    assert cls.__dataclass_params__.frozen, key
    opts = cls(**{f.name: "placeholder" for f in dataclasses.fields(cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.output_dir = "elsewhere"


def test_the_learning_rate_is_scaled_by_the_global_batch_and_returned():
    from sketch2real.training.loop import effective_learning_rate

    opts = parse_options(_db(), ["--learning_rate", "1e-4", "--scale_lr", "--train_batch_size", "3",
                                 "--gradient_accumulation_steps", "2", "--pretrained_model_name_or_path", "m",
                                 "--output_dir", "o"])
    assert effective_learning_rate(opts, 4) == pytest.approx(1e-4 * 3 * 2 * 4) and opts.learning_rate == 1e-4
    assert effective_learning_rate(dataclasses.replace(opts, scale_lr=False), 4) == 1e-4


def test_dreambooth_defaults_are_diffusers_scripts_for_the_family(tiny_models):
    """A diffusers user's command line keeps its meaning: the learning rate and weight decay of diffusers' DreamBooth
    script for the family and kind (SD 1.x: train_dreambooth.py 5e-6, train_dreambooth_lora.py 5e-4, both 1e-2; SDXL
    LoRA 1e-4 and 1e-4; SD3 and FLUX 1e-4 and 1e-4), given values or a config's win; `--rank` is `--lora_rank`, and
    `--optimizer AdamW` (diffusers' spelling) is adamw. A LoRA run at 1e-4 where diffusers' SD 1.x script trains at 5e-4
    learned 5x slower than the script a user compared it with."""
    from sketch2real.training.sequential import SequentialOptions

    expected = {tiny_models.sd: ((5e-6, 1e-2), (5e-4, 1e-2)), tiny_models.sdxl: ((5e-6, 1e-2), (1e-4, 1e-4)),
                tiny_models.sd3: ((1e-4, 1e-4), (1e-4, 1e-4)), tiny_models.flux: ((1e-4, 1e-4), (1e-4, 1e-4)),
                tiny_models.flux2_klein: ((1e-4, 1e-4), (1e-4, 1e-4))}
    for cls in (_db(), SequentialOptions):
        for model, (full, lora) in expected.items():
            base = ["--pretrained_model_name_or_path", str(model), "--output_dir", "o"]
            opts = parse_options(cls, base)
            assert (opts.learning_rate, opts.adam_weight_decay) == full, (cls, model)
            for rank in ("--lora_rank", "--rank"):
                opts = parse_options(cls, [*base, rank, "8"])
                assert (opts.lora_rank, opts.learning_rate, opts.adam_weight_decay) == (8, *lora), (cls, model, rank)
            opts = parse_options(cls, [*base, "--rank", "8", "--learning_rate", "3e-4", "--adam_weight_decay", "0"])
            assert (opts.learning_rate, opts.adam_weight_decay) == (3e-4, 0)
    assert [parse_options(_db(), ["--optimizer", name]).optimizer for name in ("AdamW", "Prodigy", "adamw")] == [
        "adamw", "prodigy", "adamw"]
    assert parse_options(_db(), ["--optimizer", "Prodigy"]).learning_rate == 1.0
    with pytest.raises(UserError, match="unknown optimizer 'lion'"):
        parse_options(_db(), ["--optimizer", "Lion"])


def test_a_normal_return_leaves_the_process_group_after_a_barrier(tmp_path, monkeypatch):
    """Every script's ranks leave together: a rank that exited while rank 0 still wrote its report aborted in gloo's
    teardown (eval/fid.py, infer/*.py made a group and never destroyed it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    calls = []
    barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), barrier(*a, **k)))
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(lambda: 0)
        assert stop.value.code == 0 and calls == ["barrier"] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


ENTRY_SCRIPT = '''
import atexit, sys
from sketch2real.cli import UserError, run_main

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

KEEP = Finalized()  # a module global: only the interpreter's finalization destroys it
atexit.register(lambda: print("atexit ran", flush=True))

def main():
    sys.stdout.write("last line, still buffered;")
    if sys.argv[1] == "user-error":
        raise UserError("no such folder")
    return int(sys.argv[1])

if __name__ == "__main__":
    run_main(main)
'''


@pytest.mark.parametrize("argument, code", [("0", 0), ("3", 3), ("user-error", 2)])
def test_a_script_ends_after_its_exit_work_without_the_interpreter_s_finalization(argument, code, tmp_path):
    """A script's process ends with its exit status, its atexit handlers run and its output flushed, but without
    tearing down every object first (~1.6 s of CPU per process after torch, diffusers and transformers)."""
    import subprocess

    script = tmp_path / "entry.py"
    script.write_text(ENTRY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), argument], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "last line, still buffered;atexit ran\n", proc.stdout  # no "finalized"
    assert proc.stderr == ("entry.py: error: no such folder\n" if code == 2 else "")


def test_offline_a_hub_id_loads_from_the_hub_cache_and_one_not_there_stops_in_one_line(tmp_path, monkeypatch):
    """Compute nodes without network run with HF_HUB_OFFLINE=1 and a cache filled on a login node: a cached hub id
    passes the early check (it used to be refused, as any hub id offline); an id the cache lacks is one line."""
    from huggingface_hub import constants

    from sketch2real.cli import UserError
    from sketch2real.models import check_model_path

    revision = "1" * 40
    repo = tmp_path / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(UserError, match=r"someone/elsewhere is not in the hub cache and HF_HUB_OFFLINE=1"):
        check_model_path("someone/elsewhere")
    with pytest.raises(UserError, match="not found: /no/such/folder"):
        check_model_path("/no/such/folder")


def test_the_default_resolution_is_the_family_s_as_diffusers_scripts(tiny_models):
    """SDXL trains at 1024 px when --resolution is not given (diffusers' SDXL scripts' default: at 512 it learns a size
    it does not generate at), SD 1.x and the flow families at 512; a given value or a config's wins, in every trainer."""
    from sketch2real.training.controlnet import ControlNetOptions
    from sketch2real.training.sequential import SequentialOptions
    from sketch2real.training.textual_inversion import TextualInversionOptions

    for cls in (_db(), SequentialOptions, TextualInversionOptions, ControlNetOptions):
        for model, side in ((tiny_models.sdxl, 1024), (tiny_models.sd, 512), (tiny_models.flux, 512)):
            base = ["--pretrained_model_name_or_path", str(model), "--output_dir", "o"]
            assert parse_options(cls, base).resolution == side, (cls, model)
            assert parse_options(cls, [*base, "--resolution", "64"]).resolution == 64
    assert "SDXL: 1024" in _db().__dataclass_fields__["resolution"].metadata["help"]


def test_a_fingerprint_s_defaults_are_this_run_s(tiny_models):
    """An option missing from an older checkpoint's fingerprint counts as the same run at its default: the default
    this run would resolve (a LoRA's learning rate 1e-4, not full DreamBooth's 5e-6; SDXL's 1024 px), else a LoRA run
    at its own default was refused and one given 5e-6 resumed a checkpoint trained at 1e-4."""
    from sketch2real.training.checkpoints import run_fingerprint

    base = ["--pretrained_model_name_or_path", str(tiny_models.sdxl), "--output_dir", "o", "--lora_rank", "4"]
    at_defaults = run_fingerprint(parse_options(_db(), base), 1)
    older = {k: v for k, v in at_defaults.items() if k not in ("learning_rate", "resolution", "adam_weight_decay")}
    assert at_defaults.matches(older)
    assert not run_fingerprint(parse_options(_db(), [*base, "--learning_rate", "5e-6"]), 1).matches(older)
    assert not run_fingerprint(parse_options(_db(), [*base, "--adam_weight_decay", "1e-2"]), 1).matches(older)
    assert not run_fingerprint(parse_options(_db(), [*base, "--resolution", "512"]), 1).matches(older)


def test_an_edited_captions_file_is_another_run_for_a_resume(tmp_path):
    """The captions are a run's data: a checkpoint of a run whose captions file has since changed is not resumed as
    this run's (it was); one saved before the file's content was recorded still is."""
    from sketch2real.training.checkpoints import run_fingerprint

    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"key": "cat/a-1", "category": "cat", "prompt_id": "1", "caption": "a drawing of a cat"}\n')
    opts = parse_options(_db(), ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--shard_dir", "s",
                                 "--instance_prompt", "a sks sketch of a {category}", "--captions", str(captions)])
    saved = dict(run_fingerprint(opts, 1))
    captions.write_text(captions.read_text().replace("drawing", "photo"))
    now = run_fingerprint(opts, 1)
    assert not now.matches(saved) and "captions_data" in now.differences(saved)
    assert now.matches({k: v for k, v in saved.items() if k != "captions_data"})


def test_shards_and_captions_copied_elsewhere_are_the_same_run_for_a_resume(tmp_path):
    """Shards and captions are known by their contents: a job that copies them elsewhere (a node's local disk, a moved
    project) resumes its checkpoints, also those saved when their paths were part of the fingerprint; other contents
    are another run."""
    import shutil

    from sketch2real.training.checkpoints import run_fingerprint

    shards, captions = tmp_path / "shards", tmp_path / "captions.jsonl"
    shards.mkdir()
    (shards / "train.json").write_text('{"total": 3}')
    captions.write_text('{"key": "cat/a-1", "category": "cat", "prompt_id": "1", "caption": "a drawing of a cat"}\n')

    def fingerprint(shard_dir, captions_file):
        return run_fingerprint(parse_options(_db(), ["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                                     "--shard_dir", str(shard_dir), "--captions", str(captions_file)]), 1)

    saved = dict(fingerprint(shards, captions))
    older = {**saved, "shard_dir": str(shards), "captions": str(captions)}  # as checkpoints recorded them before
    shutil.copytree(shards, tmp_path / "local" / "shards")
    shutil.copy(captions, tmp_path / "local" / "captions.jsonl")
    moved = fingerprint(tmp_path / "local" / "shards", tmp_path / "local" / "captions.jsonl")
    assert moved.matches(saved) and moved.matches(older)
    (tmp_path / "local" / "shards" / "train.json").write_text('{"total": 4}')
    assert not fingerprint(tmp_path / "local" / "shards", captions).matches(older)
    # a run without captions is another run (its fingerprint: captions '' and no contents), and a checkpoint saved
    # before captions were known by contents (the path alone) is this run's at that path only
    without = dict(run_fingerprint(parse_options(_db(), ["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                                         "--shard_dir", str(shards)]), 1))
    assert without["captions"] == "" and not fingerprint(shards, captions).matches(without)
    by_path = {k: v for k, v in older.items() if k != "captions_data"}
    assert fingerprint(shards, captions).matches(by_path) and not moved.matches(by_path)
    assert "captions: " in moved.differences(by_path)


def test_captions_that_reach_no_image_are_one_line_not_a_template_run(tmp_path):
    """A mistyped --caption_prompt_id, captions of another split, or --caption_prompt_id without --captions trained
    the template alone, silently; each is one line now."""
    from sketch2real.training.prompts import SamplePrompts, check_captions_file

    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"key": "cat/a-1", "category": "cat", "prompt_id": "short", "caption": "a drawing of a cat"}\n')
    with pytest.raises(UserError, match="no captions of --caption_prompt_id long in .* \\(its prompt ids: short\\)"):
        SamplePrompts.load("a {category}", str(captions), "long")
    prompts = SamplePrompts.load("a {category}", str(captions), "short")
    prompts.check_covers(["cat/a-1", "cat/b-1"], "instance images")  # one of two: the other takes the template
    with pytest.raises(UserError, match="none of the 2 instance images has a caption"):
        prompts.check_covers(["dog/x-1", "dog/y-1"], "instance images")
    with pytest.raises(UserError, match="--caption_prompt_id chooses among --captions' prompts"):
        check_captions_file("", "short")


def test_flags_that_do_nothing_in_their_company_are_named_in_a_warning(caplog):
    """Accepted and silently ignored before (the card even listed them): --lr_warmup_steps under a constant schedule
    (diffusers' ignores it), --text_encoder_lr under Prodigy, shard flags beside a folder of images and no shards. A
    warning, not a refusal: a run trained with them still resumes with the same flags."""
    from sketch2real.cli import parse_options
    from sketch2real.training.dreambooth import DreamBoothOptions
    from sketch2real.training.textual_inversion import TextualInversionOptions

    base = ["--pretrained_model_name_or_path", "m", "--output_dir", "o"]
    for cls, args, said in (
            (DreamBoothOptions, ["--shard_dir", "s", "--lr_warmup_steps", "3"],
             "--lr_warmup_steps 3 does nothing under --lr_scheduler constant"),
            (DreamBoothOptions, ["--shard_dir", "s", "--optimizer", "prodigy", "--train_text_encoder",
                                 "--text_encoder_lr", "1e-6"], "--text_encoder_lr is not used: Prodigy"),
            (DreamBoothOptions, ["--instance_data_dir", "d", "--instance_category", "cat"], "--instance_category: not used"),
            (TextualInversionOptions, ["--train_data_dir", "d", "--categories", "cat", "--instance_image_type", "photo"],
             "--categories and --instance_image_type: not used"),
            (DreamBoothOptions, ["--shard_dir", "s", "--ema_decay", "0.99", "--prodigy_beta3", "0.9", "--logit_mean", "1"],
             "--prodigy_beta3: not used without --optimizer prodigy; --ema_decay: not used without --use_ema; --logit_mean: "
             "not used without --weighting_scheme logit_normal")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="sketch2real"):
            parse_options(cls, [*base, *args]).check()
        assert said in caplog.text, (args, caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sketch2real"):  # where they do something: no word
        parse_options(DreamBoothOptions, [*base, "--shard_dir", "s", "--lr_warmup_steps", "3", "--lr_scheduler",
                                          "constant_with_warmup", "--instance_data_dir", "d", "--instance_category",
                                          "cat", "--use_ema", "--ema_decay", "0.99"]).check()
    assert "not used" not in caplog.text and "does nothing" not in caplog.text


def test_a_log_line_written_while_a_progress_bar_runs_is_a_line_of_its_own():
    """A corrupt-sample warning met mid-epoch was written after the bar's text, on the bar's line: in a terminal and
    in a Slurm log the bar then ran on from the warning's end."""
    import io
    import logging

    from tqdm import tqdm

    from sketch2real.cli import _AboveProgressBars

    stream, logger = io.StringIO(), logging.getLogger("sketch2real.test_bar")
    handler = _AboveProgressBars(stream)
    logger.addHandler(handler)
    try:
        with tqdm(total=3, file=stream, mininterval=0, ascii=True) as bar:
            bar.update(1)
            logger.warning("corrupt sample shard-0.tar:cat/x (empty): skipped")
            bar.update(2)
    finally:
        logger.removeHandler(handler)
    shown = [line.rsplit("\r", 1)[-1] for line in stream.getvalue().split("\n")]  # what a terminal shows of each line
    assert "corrupt sample shard-0.tar:cat/x (empty): skipped" in shown
    assert [line for line in shown if line.strip()][-1].startswith("100%")  # the bar drawn again, below it


def test_a_user_error_raised_in_a_data_loader_worker_is_its_own_line():
    """torch re-raises a worker's exception with the worker's traceback as its message: the one-line error was ~1,500
    characters of escaped traceback."""
    from torch.utils.data._utils import ExceptionWrapper  # what DataLoader's workers send back

    from sketch2real.cli import UserError, error_message

    try:
        raise UserError("no readable instance image in the shards")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as caught:
        wrapped.reraise()
    assert "Traceback" in str(caught.value) and error_message(caught.value) == "no readable instance image in the shards"
    assert error_message(UserError("a\nb")) == "a\\nb"  # its own line breaks escaped, as before
