"""The command lines slurm/*.sh build for a 2-node allocation (no Slurm needed: srun, scontrol and accelerate's
launcher are stand-ins that record what they are given), then read by accelerate's own launcher as it would on each node."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO

FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" > "$FAKE_LOG/srun.args"
while [ "$1" != bash ]; do shift; done
for node in 0 1; do SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?; done
"""
# python3 records `-m sketch2real.launcher ARGS` (accelerate launch's) as `launch ARGS` and runs everything else for real.
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m sketch2real.launcher" ]; then
  shift 2; printf '%s\\n' launch "$@" > "$FAKE_LOG/accelerate.node$SLURM_NODEID.args"; exit 0
fi
exec {sys.executable} "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-a\\ngpu-node-b\\n'
[ "$1 $2" = "show node" ] && echo "NodeName=$3 Arch=x86_64 CoresPerSocket=8 NodeAddr=10.1.2.$([ "$3" = gpu-node-a ] && echo 3 || echo 4) NodeHostName=$3"
"""


def _two_node_job(tmp_path: Path, script: str, config: str, *args: str) -> tuple[str, list[list[str]]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(parents=True)
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("python3", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[a-b]", "SLURM_CPUS_PER_TASK": "32",
           "SLURM_GPUS_ON_NODE": "8", "ACCELERATE_CONFIG": config, "SKETCH2REAL_HOME": str(REPO)}
    for name in ("MASTER_ADDR", "MASTER_PORT", "PRECISION"):
        env.pop(name, None)
    proc = subprocess.run(["bash", f"slurm/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    nodes = [(log / f"accelerate.node{n}.args").read_text().splitlines() for n in (0, 1)]
    return (log / "srun.args").read_text().strip(), nodes


def _accelerate_plan(argv: list[str]):
    """What `accelerate launch argv` does on that node: accelerate's own parsing, config and DeepSpeed planning."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    assert argv[0] == "launch"
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv[1:]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
    cmd, env = prepare_deepspeed_cmd_env(args)
    return args, cmd, env


@pytest.mark.parametrize("config", ["accelerate_configs/deepspeed_zero2.yaml", "accelerate_configs/deepspeed_zero3.yaml"])
def test_deepspeed_across_two_nodes_launches_through_srun(tmp_path, config):
    srun, nodes = _two_node_job(tmp_path, "dreambooth.sh", config, "--train_text_encoder")
    # One launcher per node, each with the job's CPUs (srun no longer inherits --cpus-per-task since Slurm 22.05).
    assert srun.startswith("--kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=32 bash slurm/launch_node.sh train/dreambooth.py")
    for rank, argv in enumerate(nodes):
        assert "--train_text_encoder" in argv and "--mixed_precision" not in argv  # precision: the config's bf16
        assert argv[-4:] == ["--output_dir", "runs/dreambooth_cat", "--resume_from_checkpoint", "latest"]  # the job's own
        args, cmd, env = _accelerate_plan(argv)
        assert args.use_deepspeed and args.deepspeed_multinode_launcher == "standard"
        assert cmd is None  # torch.distributed.run on this node, not the `deepspeed` runner over pdsh/ssh
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", rank, "8")
        endpoint = f"{args.master_addr}:{args.master_port}" if hasattr(args, "master_addr") else args.rdzv_endpoint
        assert endpoint == f"10.1.2.3:{20000 + 4242}"  # the job's first node's NodeAddr, a port from the job id
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_ddp_across_two_nodes(tmp_path):
    _, nodes = _two_node_job(tmp_path, "textual_inversion.sh", "accelerate_configs/multi_node.yaml")
    for rank, argv in enumerate(nodes):
        i = argv.index
        assert argv[i("--num_machines") + 1] == "2" and argv[i("--num_processes") + 1] == "16"
        assert argv[i("--machine_rank") + 1] == str(rank) and argv[i("--main_process_ip") + 1] == "10.1.2.3"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_one_meaning_per_variable_stages_models_categories(tmp_path, monkeypatch):
    """STAGES is pipeline.sh's list of methods (sbatch passes it on to every job): the sequential job trains its own
    CATEGORIES; the captioning job reads CAPTION_MODEL, not the diffusion MODEL pipeline.sh passes on."""
    monkeypatch.setenv("STAGES", "dreambooth dreambooth_sequential")
    monkeypatch.setenv("MODEL", "/models/sd")
    _, nodes = _two_node_job(tmp_path / "a", "dreambooth_sequential.sh", "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--stages") == "cat,dog,helicopter,hamburger"
    monkeypatch.setenv("CATEGORIES", "cat,apple")
    _, nodes = _two_node_job(tmp_path / "b", "dreambooth_sequential.sh", "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--stages") == "cat,apple" and _flag(nodes[0], "--pretrained_model_name_or_path") == "/models/sd"
    _, nodes = _two_node_job(tmp_path / "c", "caption.sh", "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--model_name_or_path") == "llava-hf/llava-1.5-7b-hf"
    monkeypatch.setenv("CAPTION_MODEL", "/models/blip2")
    _, nodes = _two_node_job(tmp_path / "d", "caption.sh", "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--model_name_or_path") == "/models/blip2"


def test_caption_s_prompts_variable_is_a_list_of_ids(tmp_path, monkeypatch):
    """PROMPTS="4 5 8" (the study's three prompts) reached caption.py as one argument: every sketch captioned with the
    literal prompt text "4 5 8", exit 0."""
    monkeypatch.setenv("PROMPTS", "4 5 8")
    _, nodes = _two_node_job(tmp_path, "caption.sh", "accelerate_configs/multi_node.yaml")
    at = nodes[0].index("--prompts")
    assert nodes[0][at + 1 : at + 4] == ["4", "5", "8"]


def test_a_misspelt_stage_or_config_stops_the_pipeline_before_any_job(tmp_path):
    """STAGES="dreambooth caption" dropped the captions (the stage is `captions`) and a CONFIGS/dreambooth.yml was
    never read (the jobs ran on the scripts' defaults), each with exit 0: one line, exit 2, nothing submitted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/submitted\necho 7\n')
    (bin_dir / "sbatch").chmod(0o755)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "dreambooth.yml").write_text("max_train_steps: 10\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNS": str(tmp_path / "runs")}
    for settings, said in (({"STAGES": "dreambooth caption"}, "unknown stage 'caption'"),
                           ({"CONFIGS": str(configs)}, "dreambooth.yml is no job's"),
                           ({"CONFIGS": str(tmp_path / "none")}, "is not a folder")):
        proc = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env={**env, **settings}, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and said in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not (tmp_path / "submitted").exists()
    (configs / "dreambooth.yml").rename(configs / "dreambooth.yaml")
    proc = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env={**env, "CONFIGS": str(configs),
                                                                       "STAGES": "dreambooth captions"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"--config {configs}/dreambooth.yaml" in (tmp_path / "submitted").read_text()


def test_category_all_trains_a_style_over_every_category(tmp_path, monkeypatch):
    """README's "A style over every category": CATEGORY= still meant cat, and --instance_category was always given."""
    monkeypatch.setenv("CATEGORY", "all")
    _, nodes = _two_node_job(tmp_path, "dreambooth.sh", "accelerate_configs/multi_node.yaml")
    assert "--instance_category" not in nodes[0] and _flag(nodes[0], "--instance_prompt") == "a sks sketch of a {category}"
    assert _flag(nodes[0], "--output_dir") == "runs/dreambooth_all"
    monkeypatch.setenv("CATEGORY", "car_(sedan)")
    _, nodes = _two_node_job(tmp_path / "one", "dreambooth.sh", "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--instance_category") == "car_(sedan)"
    assert _flag(nodes[0], "--instance_prompt") == "a car (sedan) in the style of sks"


@pytest.mark.parametrize("script", ["dreambooth.sh", "dreambooth_sequential.sh", "textual_inversion.sh", "controlnet.sh"])
def test_without_resolution_the_trainer_decides_so_a_config_or_the_family_s_default_counts(tmp_path, monkeypatch, script):
    """A job given no RESOLUTION passes no --resolution: a CONFIGS yaml's `resolution` then counts (a flag would win
    over it) and SDXL trains at its 1024 px; RESOLUTION still sets it."""
    monkeypatch.delenv("RESOLUTION", raising=False)
    _, nodes = _two_node_job(tmp_path / "a", script, "accelerate_configs/multi_node.yaml")
    assert "--resolution" not in nodes[0]
    monkeypatch.setenv("RESOLUTION", "768")
    _, nodes = _two_node_job(tmp_path / "b", script, "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--resolution") == "768"


@pytest.mark.parametrize("script, trainer", [("dreambooth.sh", "DreamBoothOptions"),
                                             ("textual_inversion.sh", "TextualInversionOptions"),
                                             ("controlnet.sh", "ControlNetOptions")])
def test_a_config_given_to_a_job_script_wins_over_its_variables_and_defaults(tmp_path, monkeypatch, script, trainer):
    """CONFIGS' dreambooth.yaml (or `--config` after the script) says max_train_steps 1000 and fp16: the trainer gets
    them, not the script's STEPS and PRECISION; a flag after the config still wins; the job's OUTPUT and resume stay
    (Slurm's requeue and the PREEMPTED check read that folder)."""
    from sketch2real.cli import parse_options
    from tests.test_options import options_class

    config = tmp_path / "job.yaml"
    # a run's run_config.json as the config: its folder and resume are not the job's (the job writes and resumes OUTPUT)
    config.write_text("max_train_steps: 1000\nmixed_precision: fp16\ncheckpointing_steps: 7\noutput_dir: runs/old\n"
                      "resume_from_checkpoint: null\n")
    monkeypatch.setenv("OUTPUT", "runs/job")
    monkeypatch.setenv("STEPS", "400")
    monkeypatch.setenv("PRECISION", "bf16")
    for extra, steps in (([], 1000), (["--max_train_steps", "9"], 9)):
        _, nodes = _two_node_job(tmp_path / str(steps), script, "accelerate_configs/multi_node.yaml", "--config",
                                 str(config), *extra)
        argv = nodes[0][nodes[0].index(next(a for a in nodes[0] if a.startswith("train/"))) + 1:]
        opts = parse_options(options_class(trainer), argv)
        assert (opts.max_train_steps, opts.mixed_precision, opts.checkpointing_steps) == (steps, "fp16", 7)
        assert (opts.output_dir, opts.resume_from_checkpoint) == ("runs/job", "latest")


REMOVED_MODEL_IDS = ("runwayml/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4")  # gone from the hub


@pytest.mark.parametrize("script", ["dreambooth.sh", "dreambooth_sequential.sh", "textual_inversion.sh", "controlnet.sh",
                                    "generate.sh"])
def test_the_default_base_model_is_one_the_hub_still_has(tmp_path, monkeypatch, script):
    monkeypatch.delenv("MODEL", raising=False)
    _, nodes = _two_node_job(tmp_path, script, "accelerate_configs/multi_node.yaml")
    assert _flag(nodes[0], "--pretrained_model_name_or_path") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_no_file_names_a_model_removed_from_the_hub():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    named = [path for path in tracked if path != "tests/test_slurm_commands.py" and (REPO / path).is_file()
             and any(old in (REPO / path).read_text(errors="replace") for old in REMOVED_MODEL_IDS)]
    assert not named


def test_every_log_folder_the_scripts_name_is_in_a_fresh_clone():
    """Slurm opens `#SBATCH --output` before the script runs and makes no folder: the folder ships with the repo."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = {os.path.dirname(path) for path in tracked}
    for script in sorted((REPO / "slurm").glob("*.sh")):
        for line in script.read_text().splitlines():
            if line.startswith("#SBATCH --output="):
                assert os.path.dirname(line.split("=", 1)[1]) in folders, (script.name, line)


def test_the_rendezvous_port_moves_past_one_already_taken_on_the_first_node():
    """Two clusters on one host (or any program) may hold the port the job id gives: the job takes the next free one."""
    job_id = 4243
    env = {**os.environ, "SLURM_JOB_ID": str(job_id), "MASTER_ADDR": "127.0.0.1", "SKETCH2REAL_HOME": str(REPO)}
    env.pop("MASTER_PORT", None)

    def chosen_port() -> int:
        proc = subprocess.run(["bash", "-c", "source slurm/common.sh && echo $MASTER_PORT"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1])

    assert chosen_port() == 20000 + job_id
    with socket.socket() as held:
        held.bind(("", 20000 + job_id))
        held.listen()
        assert chosen_port() == 20000 + job_id + 1


def test_scripts_that_expand_arrays_drop_set_u_on_bash_before_4_4():
    """bash before 4.4 (RHEL/CentOS 7 login and compute nodes) calls an empty array unbound under `set -u` (the FID
    job with no extractor set, the pipeline with no sbatch flags): every script expanding an array drops -u there.
    The bash here is newer, so the rule is checked in the text."""
    import re

    guard = "((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || set +u"
    scripts = [p for p in [*sorted((REPO / "slurm").glob("*.sh")), REPO / "scripts/demo.sh"]
               if re.search(r"\$\{!?\w+\[@\]", p.read_text()) and p.name != "local_cluster.sh"]
    assert {p.name for p in scripts} >= {"fid.sh", "pipeline.sh", "reproduce_study.sh", "demo.sh"}
    for script in scripts:
        lines = script.read_text().splitlines()
        strict = lines.index("set -euo pipefail")
        assert guard in lines[strict + 1 : strict + 3], script.name


def test_data_prep_job_flags_reach_the_step_that_takes_them(sketchy_root, tmp_path):
    """`sbatch slurm/data_prep.sh --categories cat apple --max_samples_per_shard 7`: the splits keep two categories
    (build_splits.py's flag: make_shards.py refused it, so no split flag could be given) and the shards hold 7 samples
    at most (make_shards.py's); a flag neither takes is one line, exit 2."""
    env = {**os.environ, "SKETCHY": str(sketchy_root), "DATA": str(tmp_path / "data"), "SKETCH2REAL_HOME": str(REPO),
           "SLURM_CPUS_PER_TASK": "1", "MASTER_ADDR": "localhost"}  # one shard writer; no scontrol (no controller here)
    run = lambda *flags: subprocess.run(["bash", "slurm/data_prep.sh", *flags], cwd=REPO, env=env, capture_output=True,  # noqa: E731
                                        text=True, timeout=300)
    proc = run("--categories", "cat", "apple", "--max_samples_per_shard", "7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "data" / "splits" / "train.jsonl").read_text().splitlines()]
    assert {row["category"] for row in rows} == {"cat", "apple"}
    index = json.loads((tmp_path / "data" / "shards" / "train.json").read_text())
    assert len(index["shards"]) > 1 and max(len(shard["keys"]) for shard in index["shards"]) == 7
    proc = run("--categorie", "cat")
    assert proc.returncode == 2 and "unknown option --categorie" in proc.stderr.strip().splitlines()[-1]


RESUMABLE_JOBS = ("dreambooth.sh", "dreambooth_sequential.sh", "textual_inversion.sh", "controlnet.sh", "generate.sh",
                  "caption.sh")  # their programs stop at Slurm's signal with PREEMPTED and go on when rerun


@pytest.mark.parametrize("script", RESUMABLE_JOBS)
def test_a_resumable_job_asks_for_the_signal_and_requeues_on_preempted(script):
    """Generation and captioning of the whole test split outlast a 4-hour limit: their jobs ended there (no signal,
    no requeue) where the trainers' went on."""
    text = (REPO / "slurm" / script).read_text()
    assert {"#SBATCH --signal=USR1@180", "#SBATCH --requeue", "#SBATCH --open-mode=append"} <= set(text.splitlines())
    assert re.search(r'^s2r_finish "\$OUTPUT" "\$status"$', text, re.M), script


def test_the_scoring_job_is_requeued_when_preempted():
    """A preempted fid job was not requeued (nothing of the chain's last job ran again): it is, appending to its log,
    and starts over (from the cached reference features)."""
    text = (REPO / "slurm" / "fid.sh").read_text()
    assert {"#SBATCH --requeue", "#SBATCH --open-mode=append"} <= set(text.splitlines())


@pytest.mark.parametrize("settings, message", [
    ({"CATEGORY": "dgo"}, "dgo: no such category in {shards}'s train split"),
    ({"STUDY_SAMPLES": "100"}, "STUDY_SAMPLES=100: {shards}'s test split has 27 samples")])
def test_the_study_chain_checks_its_categories_and_samples_before_submitting(settings, message, tmp_path):
    """After data prep, reproduce_study.sh refuses a category typo or more evaluation sketches than the test split
    has in one line, before any job is submitted (the last job of the chain found it, after every training)."""
    shards, bin_dir = tmp_path / "shards", tmp_path / "bin"
    shards.mkdir()
    bin_dir.mkdir()
    (shards / "train.json").write_text(json.dumps({"shards": [{"categories": ["cat", "dog", "apple"]}], "total": 3}))
    (shards / "test.json").write_text(json.dumps({"shards": [{"categories": ["cat"] * 27}], "total": 27}))
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHARDS": str(shards), "CATEGORIES": "dog,apple",
           "STUDY_SAMPLES": "6", **settings}
    proc = subprocess.run(["bash", "slurm/reproduce_study.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"reproduce_study.sh: error: {message.format(shards=shards)}" + (
            " (CATEGORY, CATEGORIES; names as in Sketchy, e.g. car_(sedan))" if "category" in message else "")]
    assert not (tmp_path / "submitted").exists()
    proc = subprocess.run(["bash", "slurm/reproduce_study.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**env, "CATEGORY": "cat", "STUDY_SAMPLES": "6", "RUNS": str(tmp_path / "runs")})
    assert proc.returncode == 0 and (tmp_path / "submitted").exists(), proc.stderr  # the same settings, fixed: submitted


def test_the_pipeline_generates_a_style_over_every_category_with_the_prompt_it_trained(tmp_path):
    """CATEGORY=all trains `a sks sketch of a {category}` (slurm/dreambooth.sh); the pipeline generated it with one
    category's template, `a {category} in the style of sks`, a prompt never trained."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$OUTPUT $*" >> {tmp_path}/submitted\necho 7\n')
    (bin_dir / "sbatch").chmod(0o755)
    for category, template in (("all", "a sks sketch of a {category}"), ("cat", "a {category} in the style of sks")):
        (tmp_path / "submitted").unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STAGES": "dreambooth", "CATEGORY": category,
               "RUNS": str(tmp_path / "runs"), "SKETCHY": str(tmp_path)}
        proc = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        generation = next(line for line in (tmp_path / "submitted").read_text().splitlines() if "slurm/generate.sh" in line)
        assert f"--pretrained_model_name_or_path {tmp_path}/runs/dreambooth_{category}" in generation
        assert generation.endswith(f"--prompt_template {template}"), generation


def test_a_job_whose_log_is_a_file_redraws_its_progress_bars_every_30_seconds(tmp_path):
    """In a job's log file tqdm's 0.1 s redraws made one line of ~300 KB of fragments over a 3,000-step run: every bar
    of the job (tqdm reads TQDM_* at import) redraws every 30 s, unless the user set it; a terminal keeps tqdm's."""
    env = {**os.environ, "SLURM_JOB_ID": "4243", "MASTER_ADDR": "127.0.0.1", "SKETCH2REAL_HOME": str(REPO)}
    env.pop("TQDM_MININTERVAL", None)
    env.pop("TQDM_MAXINTERVAL", None)
    show = ("source slurm/common.sh && python3 -c 'import os; from tqdm.auto import tqdm; "
            "bar = tqdm(total=1, file=open(os.devnull, \"w\")); print(bar.mininterval, bar.maxinterval)'")
    for preset, expected in ((None, "30.0 30.0"), ("5", "5.0 30.0")):
        with open(tmp_path / "job.out", "w") as log:  # stderr a file, as sbatch makes it
            proc = subprocess.run(["bash", "-c", show], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                  env={**env, **({"TQDM_MININTERVAL": preset} if preset else {})}, timeout=60)
        assert " ".join(proc.stdout.split()[-2:]) == expected  # (its monitor forced a redraw every 10 s)
