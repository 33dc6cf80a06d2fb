import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from .helpers import REPO, launch, run_script


@pytest.fixture
def gen_args(tiny_models, shard_dir):
    return ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--split", "test",
            "--height", "64", "--width", "64", "--num_inference_steps", "3", "--max_per_category", "2",
            "--prompt_template", "a photo of a {category}"]


def _images(folder) -> dict[str, bytes]:
    root = folder / "images"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_images_are_identical_on_one_and_two_processes(gen_args, tmp_path, tiny_models):
    run_script("infer/generate.py", *gen_args, "--output_dir", tmp_path / "one", "--batch_size", "3")
    launch("infer/generate.py", *gen_args, "--output_dir", tmp_path / "two", "--batch_size", "3")
    one, two = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert len(one) == 10 and one == two
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["num_processes"] == 2  # really data-parallel
    assert summary["generated_now"] == 10  # every rank's images (it counted rank 0's)
    rows = [json.loads(line) for line in (tmp_path / "two" / "index.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == [k[:-4] for k in sorted(one)]
    assert {"key", "category", "prompt", "seed", "generator_seed", "model", "settings"} <= set(rows[0])
    # a row's image again in plain diffusers: its generator_seed (not the job's --seed) draws it
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe, row = StableDiffusionPipeline.from_pretrained(tiny_models.sd), rows[0]
    settings = {k: row["settings"][k] for k in ("height", "width", "num_inference_steps", "guidance_scale")}
    drawn = np.asarray(Image.open(tmp_path / "two" / row["image"]), dtype=int)
    for seed, same in ((row["generator_seed"], True), (row["seed"], False)):
        image = pipe(prompt=row["prompt"], generator=torch.Generator().manual_seed(seed), **settings).images[0]
        assert (np.abs(np.asarray(image, dtype=int) - drawn).max() <= 1) == same  # 1 level: drawn in a batch of 3
    assert not list((tmp_path / "two").glob("index.rank*"))
    # Another global seed gives other images.
    run_script("infer/generate.py", *gen_args, "--output_dir", tmp_path / "seed1", "--batch_size", "3", "--seed", "1")
    assert _images(tmp_path / "seed1") != one


def test_mosaics_have_the_expected_size(gen_args, tmp_path):
    run_script("infer/generate.py", *gen_args, "--output_dir", tmp_path, "--batch_size", "4")
    cat = Image.open(tmp_path / "mosaics" / "cat.png")
    assert cat.size == (3 * 64, 2 * 64)  # sketch | generated | photo, two items
    overview = Image.open(tmp_path / "mosaics" / "overview.png")
    assert overview.size == (96 + 2 * 64, 5 * 64)  # label column + 2 images, one row per category


def test_resume_skips_finished_images_and_never_counts_a_partial_one(gen_args, tmp_path):
    out = tmp_path / "gen"
    run_script("infer/generate.py", *gen_args, "--output_dir", out, "--batch_size", "2")
    reference = _images(out)
    # Simulate a kill: one image lost, one row missing, a temp file left behind, index still in part files.
    images = sorted((out / "images").rglob("*.png"))
    images[0].unlink()
    rows = (out / "index.jsonl").read_text().splitlines()
    (out / "index.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    (images[1].parent / ".half.png.tmp").write_bytes(b"\x89PNG trunc")
    mtimes = {p: p.stat().st_mtime_ns for p in images[2:]}
    proc = run_script("infer/generate.py", *gen_args, "--output_dir", out, "--batch_size", "2")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["missing"] == 0 and summary["images"] == 10
    assert 0 < summary["generated_now"] <= 4  # only the batches holding the two lost items
    assert _images(out) == reference
    unchanged = [p for p in images[2:] if p.stat().st_mtime_ns == mtimes[p]]
    assert len(unchanged) >= len(images) - 2 - 2
    assert len((out / "index.jsonl").read_text().splitlines()) == 10


def test_a_rerun_with_other_settings_is_refused_and_one_with_another_batch_or_limit_continues(gen_args, tmp_path):
    """Images resume only under the settings that drew them (generate_config.json): another prompt template or seed
    stops in one line before any model loads and leaves the folder as it was; another batch size or a larger
    --max_per_category continues and draws only the missing images. An older run's folder (no config) resumes."""
    out = tmp_path / "gen"
    args = [*gen_args, "--num_inference_steps", "1", "--output_dir", out]
    run_script("infer/generate.py", *args, "--max_per_category", "1", "--batch_size", "2")
    first = _images(out)
    kept = {name: (out / name).read_bytes() for name in ("generate_config.json", "index.jsonl")}
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert len(first) == 5
    for extra, difference in [
        (["--prompt_template", "a drawing of a {category}"],
         "prompt_template: 'a photo of a {category}' there, 'a drawing of a {category}' now"),
        (["--seed", "1"], "seed: 0 there, 1 now"),
        # a requeue under a bf16 accelerate config (slurm/generate.sh's): its images differ by up to 14 levels
        (["--mixed_precision", "bf16"], "mixed_precision: 'no' there, 'bf16' now"),
    ]:
        proc = run_script("infer/generate.py", *args, "--max_per_category", "1", *extra, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and f"{out} holds images of other settings ({difference})" in last, proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr and "Loading pipeline components" not in proc.stderr  # stopped before loading
        assert _images(out) == first and all((out / name).read_bytes() == data for name, data in kept.items())
    proc = run_script("infer/generate.py", *args, "--max_per_category", "2", "--batch_size", "3")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    now = _images(out)
    assert summary["images"] == len(now) == 10 and summary["missing"] == 0
    assert {key: now[key] for key in first} == first
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in mtimes.items())  # the first five were not drawn again
    proc = run_script("infer/generate.py", *args, "--max_per_category", "1")  # a smaller limit: the folder holds more
    assert json.loads(proc.stdout.strip().splitlines()[-1])["beyond_this_run"] == 5
    assert f"{out} holds 5 image(s) beyond this run's 5" in proc.stderr and _images(out) == now
    (out / "generate_config.json").unlink()  # a folder of an older version: resumed as before
    index = out / "index.jsonl"  # whose rows had no generator_seed: filled in (the same derivation drew them)
    index.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "generator_seed"}) + "\n"
                             for line in index.read_text().splitlines()))
    proc = run_script("infer/generate.py", *args, "--max_per_category", "2", "--seed", "1")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["generated_now"] == 0 and _images(out) == now
    from sketch2real.training.diffusion import derive_seed

    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert len(rows) == 10 and all(r["generator_seed"] == derive_seed(0, r["key"]) for r in rows)


def test_a_rerun_after_the_model_was_trained_again_in_place_is_refused(tiny_models, tmp_path):
    """A run folder trained again (more steps, other options) at the same path: the rerun kept the old model's images
    (generated_now 0, no word) and eval scored them. Weights are known by what their path holds: its weight files'
    sizes and sampled contents, with a sketch2real run's record."""
    import shutil

    model, out = tmp_path / "run", tmp_path / "gen"
    shutil.copytree(tiny_models.sd, model)
    (model / "metrics.json").write_text(json.dumps({"fingerprint": {"seed": 0}, "steps": 4, "outputs": {"unet": 1}}))
    args = ["--pretrained_model_name_or_path", model, "--height", "32", "--width", "32", "--num_inference_steps", "1",
            "--prompts", "a cat", "--output_dir", out]
    run_script("infer/generate.py", *args)
    first = _images(out)
    (model / "metrics.json").write_text(json.dumps({"fingerprint": {"seed": 0}, "steps": 8, "outputs": {"unet": 1}}))
    proc = run_script("infer/generate.py", *args, check=False)
    assert proc.returncode == 2 and "holds images of other settings (weights_identity: " in proc.stderr.strip().splitlines()[-1]
    assert _images(out) == first
    (model / "metrics.json").unlink()  # not a sketch2real run's: its weight files' sizes and sampled contents
    proc = run_script("infer/generate.py", *args, check=False)
    assert proc.returncode == 2 and "weights_identity" in proc.stderr
    config = json.loads((out / "generate_config.json").read_text())
    del config["weights_identity"]  # a config of a version before weights were known by content: compared by path
    config["weights_content"] = {"model": "a run's record alone"}  # the version before: by path too (it was refused)
    config["weights_data"] = {"model": "sizes alone"}  # or by their sizes: by path too
    (out / "generate_config.json").write_text(json.dumps(config))
    assert json.loads(run_script("infer/generate.py", *args).stdout.strip().splitlines()[-1])["generated_now"] == 0
    # trained again in place: the same files, the same sizes, other weights; a sketch2real run's record the same too
    # (the same command on edited --instance_data_dir images: its fingerprint knows the folder by its path)
    shutil.rmtree(out)
    (model / "metrics.json").write_text(json.dumps({"fingerprint": {"seed": 0}, "steps": 8, "outputs": {"unet": 1}}))
    run_script("infer/generate.py", *args)
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-8:] = bytes(8)  # the last weight's last bytes: another value, the same size
    unet.write_bytes(bytes(data))
    proc = run_script("infer/generate.py", *args, check=False)
    assert proc.returncode == 2 and "weights_identity" in proc.stderr


def test_a_rerun_whose_prompts_changed_is_refused(tiny_models, tmp_path):
    """Other --prompts, or a captions file captioned again under the same path, is one line naming the prompt that
    differs; the first images stay."""
    base = ["--pretrained_model_name_or_path", tiny_models.sd, "--height", "32", "--width", "32", "--num_inference_steps",
            "1"]
    out = tmp_path / "prompts"
    run_script("infer/generate.py", *base, "--prompts", "a cat", "--output_dir", out)
    first = _images(out)
    proc = run_script("infer/generate.py", *base, "--prompts", "a dog", "--output_dir", out, check=False)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"{out} holds images of other settings (prompts: ['a cat'] there, ['a dog'] now): use another --output_dir or remove it")
    assert _images(out) == first and json.loads((out / "generate_config.json").read_text())["prompts"] == ["a cat"]
    captions, out = tmp_path / "captions.jsonl", tmp_path / "captions"
    rows = [{"key": "cat/n1-1", "caption": "a cat", "category": "cat", "prompt_id": "1"},
            {"key": "cat/n2-1", "caption": "a cat sitting", "category": "cat", "prompt_id": "1"}]
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_script("infer/generate.py", *base, "--captions", captions, "--output_dir", out)
    rows[1]["caption"] = "a dog"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_script("infer/generate.py", *base, "--captions", captions, "--output_dir", out, check=False)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert f"{out} holds images of other settings (prompt of cat/n2-1/1: 'a cat sitting' there, 'a dog' now)" in \
        proc.stderr.strip().splitlines()[-1]


def test_a_signal_mid_run_stops_for_requeue_and_the_rerun_completes(gen_args, tmp_path):
    out = tmp_path / "gen"
    args = gen_args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "infer/generate.py"), *map(str, args), "--output_dir", str(out),
                             "--batch_size", "1", "--num_inference_steps", "20"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and list((out / "images").rglob("*.png"))):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # Slurm's warning before a time limit: stop at the batch, slurm/generate.sh requeues
    proc.wait(timeout=60)
    assert proc.returncode == 75 and "generation stopped: rank 0 after" in (out / "PREEMPTED").read_text()
    assert 0 < len(list((out / "images").rglob("*.png"))) < 10
    run_script("infer/generate.py", *args, "--output_dir", out, "--batch_size", "1", "--num_inference_steps", "20")
    assert not (out / "PREEMPTED").exists()
    rows = (out / "index.jsonl").read_text().splitlines()
    assert len(rows) == len({json.loads(r)["key"] for r in rows}) == 10
    for path in (out / "images").rglob("*.png"):
        Image.open(path).load()  # every image on disk is complete


def _random_lora(model, folder) -> None:
    """A UNet LoRA of `model` (to_q/to_k/to_v, rank 4) whose up weights are random, so it changes the images."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)))


def test_textual_inversion_and_lora_change_the_images(gen_args, tmp_path, tiny_models):
    import torch
    from safetensors.torch import save_file

    embeds = tmp_path / "learned_embeds.safetensors"
    save_file({"<sketch>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 5}, str(embeds))
    args = [a if a != "a photo of a {category}" else "a {category} in the style of <sketch>" for a in gen_args]
    run_script("infer/generate.py", *args, "--output_dir", tmp_path / "ti", "--textual_inversion", embeds)
    plain = args[:-1] + ["a {category} in the style of"]
    run_script("infer/generate.py", *plain, "--output_dir", tmp_path / "base")
    assert _images(tmp_path / "ti").keys() == _images(tmp_path / "base").keys()
    assert _images(tmp_path / "ti") != _images(tmp_path / "base")

    _random_lora(tiny_models.sd, tmp_path / "lora")
    run_script("infer/generate.py", *plain, "--output_dir", tmp_path / "lora_out", "--lora", tmp_path / "lora")
    assert _images(tmp_path / "lora_out") != _images(tmp_path / "base")


def test_a_lora_of_another_architecture_is_one_line(tiny_models, tmp_path):
    """An SDXL LoRA given to an SD 1.x base (slurm/generate.sh's default MODEL): one line naming both, exit 2."""
    _random_lora(tiny_models.sdxl, tmp_path / "sdxl_lora")
    proc = run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd, "--lora", tmp_path / "sdxl_lora",
                      "--prompts", "a cat", "--height", "32", "--width", "32", "--num_inference_steps", "1", "--output_dir",
                      tmp_path / "gen", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--lora {tmp_path / 'sdxl_lora'} does not fit the base model {tiny_models.sd} (size mismatch in " in last
    assert "Traceback" not in proc.stderr and [line for line in proc.stderr.splitlines() if "size mismatch" in line] == [last]
    assert not list((tmp_path / "gen").rglob("*.png"))


def test_a_lora_of_another_family_is_one_line_before_any_weight_loads(tiny_models, tmp_path):
    """A LoRA whose run_config.json records a base of another family (an SD LoRA given to FLUX.1): one line naming
    both, before the base loads (diffusers loaded such LoRAs in part, or not at all, with only a warning, and the
    images were the base's). A LoRA file none of whose weights fit the base (no run_config.json to tell): one line."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "sd_lora"
    _random_lora(tiny_models.sd, lora)
    (lora / "run_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_models.sd)}))
    common = ["--prompts", "a cat", "--height", "32", "--width", "32", "--num_inference_steps", "1"]
    flux = tmp_path / "flux"
    flux.mkdir()  # only its model index: the refusal comes before any weight would load
    (flux / "model_index.json").write_text((Path(tiny_models.flux) / "model_index.json").read_text())
    proc = run_script("infer/generate.py", "--pretrained_model_name_or_path", flux, "--lora", lora, *common,
                      "--output_dir", tmp_path / "gen", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        f"--lora {lora} is a LoRA of a sd model (its run_config.json), {flux} is a flux model: give a base model of its "
        "family"), proc.stderr[-3000:]
    # a LoRA whose base is a hub id: its family from the hub cache (no network round trip), else not checked
    from huggingface_hub import constants

    from sketch2real.family import recorded_family

    from .helpers import hub_cache_of_defaults

    (lora / "run_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}))
    original = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(hub_cache_of_defaults(tiny_models))
    try:
        assert recorded_family(lora).name == "sd"
        (lora / "run_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "someone/not-cached"}))
        assert recorded_family(lora) is None
    finally:
        constants.HF_HUB_CACHE = original
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)},
              str(foreign / "pytorch_lora_weights.safetensors"))
    proc = run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd, "--lora", foreign, *common,
                      "--output_dir", tmp_path / "gen2", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        f"--lora {foreign}: none of its weights fit {tiny_models.sd} (a LoRA of another model family?)"), proc.stderr[-3000:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--textual_inversion", "/no/embeds.safetensors"], "textual inversion embeddings not found"),
        (["--prompt_template", "a {colour} {category}"], "{colour} cannot be filled in"),
        (["--captions", "/no/captions.jsonl", "--prompt_template", ""], "captions file not found"),
        (["--scheduler", "magic"], "unknown scheduler 'magic'"),
        (["--categories", "unicorn"], "unknown category 'unicorn'"),
        # another run's output given as a LoRA: diffusers' message, after the model had loaded
        (["--lora", "{ti_run}"], "holds Textual Inversion embeddings, no LoRA: give --textual_inversion"),
        (["--lora", "{pipeline}"], "is a pipeline (model_index.json), no LoRA: give it as --pretrained_model_name_or_path"),
    ],
)
def test_bad_input(gen_args, tmp_path, extra, message, tiny_models):
    ti_run = tmp_path / "ti_run"
    ti_run.mkdir()
    (ti_run / "learned_embeds.safetensors").write_bytes(b"")
    (ti_run / "run_config.json").write_text("{}")
    extra = [str(e).replace("{ti_run}", str(ti_run)).replace("{pipeline}", str(tiny_models.sd)) for e in extra]
    proc = run_script("infer/generate.py", *gen_args, "--output_dir", tmp_path / "out", *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]


def test_sdxl_loads_two_encoder_embeddings_and_refuses_an_sd1_file_in_one_line(tiny_models, shard_dir, tmp_path):
    """SDXL embeddings are {clip_l, clip_g} (A1111/kohya's format), the token from the metadata or the file name;
    an SD 1.x file, which would fit the first encoder only, is one line and exit 2."""
    import torch
    from safetensors.torch import save_file

    from sketch2real.generation import load_generation_pipeline

    sd1, sdxl = tmp_path / "sd1.safetensors", tmp_path / "zqsketch.safetensors"
    save_file({"<pencil>": torch.randn(1, 32)}, str(sd1))
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}, str(sdxl))
    pipe = load_generation_pipeline(str(tiny_models.sdxl), torch.device("cpu"), torch.float32, textual_inversion=[str(sdxl)])
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(["zqsketch", "zqsketch_1"])
        rows = encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, load_file_tensor(sdxl, key)), key
    result = run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sdxl, "--textual_inversion", sd1,
                        "--shard_dir", shard_dir, "--split", "test", "--prompt_template", "a {category} <pencil>", "--height", "64",
                        "--width", "64", "--output_dir", tmp_path / "gen", check=False)
    assert result.returncode == 2 and "an SD 1.x embedding" in result.stderr and "Traceback" not in result.stderr


def load_file_tensor(path, key):
    from safetensors.torch import load_file

    return load_file(str(path))[key]


def test_sdxl_captions_to_images_to_scores_unchanged_for_the_user(tiny_models, shard_dir, tmp_path):
    """Captioning -> generation -> FID job with an SDXL model and the SD 1.x commands: the captions are the prompts,
    2 processes draw the same images as 1, and the FID job scores them per category."""
    captions = tmp_path / "captions"
    run_script("infer/caption.py", "--model_name_or_path", tiny_models.blip2, "--shard_dir", shard_dir, "--split", "test",
               "--prompts", "1", "--max_new_tokens", "6", "--batch_size", "4", "--num_workers", "0", "--output_dir", captions)
    gen = ["--pretrained_model_name_or_path", tiny_models.sdxl, "--captions", captions / "captions.jsonl", "--height", "64",
           "--width", "64", "--num_inference_steps", "2", "--batch_size", "3"]
    run_script("infer/generate.py", *gen, "--output_dir", tmp_path / "one")
    launch("infer/generate.py", *gen, "--output_dir", tmp_path / "two")
    one = _images(tmp_path / "one")
    caption_rows = [json.loads(line) for line in (captions / "captions.jsonl").read_text().splitlines()]
    assert len(one) == len(caption_rows) and one == _images(tmp_path / "two")
    rows = [json.loads(line) for line in (tmp_path / "one" / "index.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(r["caption"].strip() for r in caption_rows)
    run_script("eval/fid.py", "--generated", f"sdxl={tmp_path / 'one'}", "--reference_shards", shard_dir, "--dims", "64",
               "--no_cache", "--batch_size", "4", "--metrics", "fid", "kid", "--output_dir", tmp_path / "scores")
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())["sets"]["sdxl"]
    assert scores["n_generated"] == len(rows) and scores["fid"] == scores["fid"]
    assert set(scores["per_category"]) == {r["category"] for r in caption_rows}


def test_a_lora_training_output_is_a_model(tmp_path):
    """A DreamBooth LoRA output folder given as the model loads its base model (from run_config.json) with the
    folder's LoRA; a pipeline folder is itself; LoRA weights without a base to find are one line."""
    import json

    from sketch2real.cli import UserError
    from sketch2real.generation import base_of_lora_output

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="give its base model"):
        base_of_lora_output(str(lora), "")
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (lora / "run_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "models/base"}))
    with pytest.raises(UserError, match=r"models/base .* as .*run_config.json records it \(a path relative to where "
                                        r"training ran\?"):  # trained from elsewhere: relative to that folder
        base_of_lora_output(str(lora), "")
    (lora / "run_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(base)}))
    assert base_of_lora_output(str(lora), "") == (str(base), str(lora))
    with pytest.raises(UserError, match="--lora is given too"):
        base_of_lora_output(str(lora), "/other")
    (lora / "model_index.json").write_text("{}")  # a full pipeline that also kept LoRA weights: the pipeline
    assert base_of_lora_output(str(lora), "/other") == (str(lora), "/other")


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_without_a_size_images_have_the_size_the_models_own_pipeline_draws(model, tiny_models, tmp_path):
    """No --height/--width: the model's own size, as plain diffusers draws it (a copy whose UNet says sample_size 6:
    48 px), recorded in the index."""
    import shutil

    from diffusers import DiffusionPipeline

    copy = tmp_path / "model"
    shutil.copytree(getattr(tiny_models, model), copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 6}))
    run_script("infer/generate.py", "--pretrained_model_name_or_path", copy, "--prompts", "a cat", "--num_inference_steps",
               "1", "--output_dir", tmp_path / "gen")
    ours = Image.open(next((tmp_path / "gen" / "images").rglob("*.png"))).size
    pipe = DiffusionPipeline.from_pretrained(copy)
    pipe.set_progress_bar_config(disable=True)
    assert ours == pipe("a cat", num_inference_steps=1).images[0].size == (48, 48)
    settings = json.loads((tmp_path / "gen" / "index.jsonl").read_text().splitlines()[0])["settings"]
    assert (settings["height"], settings["width"]) == (48, 48)


def test_without_mixed_precision_the_scripts_follow_accelerate_as_the_trainers(gen_args, monkeypatch, tmp_path):
    """`accelerate launch --mixed_precision bf16 infer/...` without the script's own flag runs the model in bf16 (it ran
    fp32: twice the memory), as the trainers and diffusers' scripts follow accelerate; what ran is recorded.
    Captioning resolves it by the same rule (its options, here)."""
    from sketch2real.captioning import CaptionOptions
    from sketch2real.cli import parse_options

    launch("infer/generate.py", *gen_args, "--max_per_category", "1", "--num_inference_steps", "1", "--categories", "cat",
           "--output_dir", tmp_path, num_processes=1, accelerate_precision="bf16")
    assert json.loads((tmp_path / "metrics.json").read_text())["dtype"] == "torch.bfloat16"
    assert json.loads((tmp_path / "generate_config.json").read_text())["mixed_precision"] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    caption = parse_options(CaptionOptions, ["--model_name_or_path", "m", "--shard_dir", "s", "--output_dir", str(tmp_path / "c")])
    caption.check()
    assert caption.mixed_precision == "bf16"


def test_a_captions_set_draws_the_template_sets_sketches_and_controlnet_checks_its_sketches_first(shard_dir, tmp_path):
    """--max_per_category limits a --captions set too (it drew every captioned sketch), to the sketches a template set
    draws (the shards' first of each category), so sets compare on the same sketches; --controlnet with captions of
    another split, or without --shard_dir, and {caption} without --captions are one line before any model loads."""
    from sketch2real.cli import UserError, parse_options
    from sketch2real.generation import GenerateOptions, build_items
    from sketch2real.shards import sample_refs

    refs = sample_refs(shard_dir, "test")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"key": r.key, "category": r.category, "prompt_id": pid, "caption": f"a {pid}"})
                                + "\n" for r in reversed(refs) for pid in ("1", "2")))  # not in the shards' order
    common = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), "--shard_dir", str(shard_dir)]

    def items(*args: str) -> list:
        return build_items(parse_options(GenerateOptions, [*common, *args]))

    template = items("--max_per_category", "1", "--prompt_template", "a {category}")
    captioned = items("--max_per_category", "1", "--captions", str(captions))
    categories = {r.category for r in refs}
    assert len(template) == len(categories) and len(captioned) == 2 * len(categories)
    assert {it.sample_key for it in captioned} == {it.sample_key for it in template}
    with pytest.raises(UserError, match="needs --captions"):
        items("--prompt_template", "a sketch, {caption}")
    with pytest.raises(UserError, match=f"{len(refs)} captioned sketches are not in split 'val'"):
        items("--captions", str(captions), "--controlnet", "cn", "--split", "val")
    common = common[:-2]
    with pytest.raises(UserError, match="with --shard_dir"):
        items("--captions", str(captions), "--controlnet", "cn")


def test_an_embedding_whose_token_no_prompt_names_is_refused_before_loading(shard_dir, tiny_models, tmp_path):
    """A pipeline run whose TI job learned `TOKEN='<pencil>'` generated from `... in the style of <sketch>`: the base
    model's images, scored as Textual Inversion's. Refused in one line; the token in the template is accepted."""
    import torch
    from safetensors.torch import save_file

    from sketch2real.cli import UserError, parse_options
    from sketch2real.generation import GenerateOptions, build_items

    embeds = tmp_path / "learned_embeds.safetensors"
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)}, str(embeds), metadata={"token": "<pencil>"})
    common = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), "--shard_dir", str(shard_dir),
              "--textual_inversion", str(embeds)]
    with pytest.raises(UserError, match="no prompt uses the token of --textual_inversion .* \\(<pencil>\\)"):
        build_items(parse_options(GenerateOptions, [*common, "--prompt_template", "a {category} in the style of <sketch>"]))
    assert build_items(parse_options(GenerateOptions, [*common, "--prompt_template", "a {category} in the style of <pencil>"]))
    # the loader registers the token the check reads: the metadata's, over the one key (diffusers alone took the key)
    from diffusers import StableDiffusionPipeline

    from sketch2real.family import load_textual_inversion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"<sketch>": torch.zeros(1, width)}, str(tmp_path / "keyed.safetensors"), metadata={"token": "<pencil>"})
    load_textual_inversion(pipe, str(tmp_path / "keyed.safetensors"))
    assert "<pencil>" in pipe.tokenizer.get_added_vocab() and "<sketch>" not in pipe.tokenizer.get_added_vocab()
    # the token as the loaders read it without metadata: a diffusers file's one key; per-encoder tensors: the file name
    for name, tensors in (("learned_embeds", {"<pencil>": torch.zeros(1, 8)}),
                          ("<pencil>", {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        common[-1] = str(tmp_path / f"{name}.safetensors")
        with pytest.raises(UserError, match="\\(<pencil>\\)"):
            build_items(parse_options(GenerateOptions, [*common, "--prompt_template", "a {category} in the style of <sketch>"]))


def test_files_that_are_not_what_a_flag_takes_are_one_line_before_or_instead_of_a_traceback(gen_args, tiny_models,
                                                                                                 tmp_path):
    """A LoRA folder without weights, a file that is not embeddings, a model folder that is no pipeline (a ControlNet
    output): one line and exit 2 (they were loaders' tracebacks, or a hub error about the network)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    not_weights = tmp_path / "notes.json"
    not_weights.write_text("{}")
    controlnet = tmp_path / "controlnet"
    controlnet.mkdir()
    (controlnet / "config.json").write_text("{}")
    cases = [(["--lora", empty], f"cannot load LoRA weights {empty} into"),
             (["--textual_inversion", not_weights], f"cannot load textual inversion embeddings {not_weights} into"),
             (["--pretrained_model_name_or_path", controlnet], "has no model_index.json: a single model (a UNet or a ControlNet")]
    for extra, message in cases:
        proc = run_script("infer/generate.py", *gen_args, "--output_dir", tmp_path / "gen", *extra, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and message in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_captions_row_without_its_fields_or_a_corrupt_line_is_one_line_not_a_lost_row(tmp_path):
    """Generation's and training's --captions: a row missing key, prompt_id or caption, or a corrupt line before the
    last, names the file and line (it was a KeyError, or the row dropped silently); a torn last line (a killed
    captioning job) is still left out."""
    from sketch2real.cli import UserError
    from sketch2real.generation import items_from_captions
    from sketch2real.training.prompts import SamplePrompts

    good = '{"key": "cat/a", "category": "cat", "prompt_id": "1", "caption": "a cat"}'
    path = tmp_path / "captions.jsonl"
    for lines, message in (([good, '{"key": "cat/b", "prompt_id": "1"}'], "line 2: no caption"),
                           ([good, '["cat/b", "1", "a cat"]', good], "line 2: a list, not an object"),
                           ([good, '{"key": "cat/b", "prompt', good], "line 2: not a JSON row")):
        path.write_text("\n".join(lines) + "\n")
        for read in (lambda: items_from_captions(str(path), None), lambda: SamplePrompts.load("{category}", str(path))):
            with pytest.raises(UserError, match=f"{path}, {message}"):
                read()
    path.write_text(good + '\n{"key": "cat/b", "prom')  # torn last line: the row being written when killed
    assert [item.sample_key for item in items_from_captions(str(path), None)] == ["cat/a"]
    # a prompt id the file lacks beside one it has: one line (the other's images only, silently, before)
    with pytest.raises(UserError, match=r"--prompt_ids 9: no captions of that id in .* \(its ids: 1\)"):
        items_from_captions(str(path), ["1", "9"])
    # two captioning runs joined, both prompt id 1: one image per (key, prompt id), so which caption drew it depended
    # on the batches (2 processes recorded the second caption beside the first one's image)
    path.write_text("\n".join([good, good.replace('"a cat"', '"a small cat"')]) + "\n")
    with pytest.raises(UserError, match=f"{path}: two captions of sample cat/a under prompt id 1"):
        items_from_captions(str(path), None)


def test_an_embedding_of_another_family_is_one_line_not_its_tensors_or_a_partial_load(tiny_models, tmp_path):
    """An SDXL/SD3 file (per-encoder tensors) given to SD 1.x: one line (diffusers' error printed the tensors); an SD3
    file (clip_l, clip_g, t5) given to FLUX.1, which has no clip_g encoder: one line (its other rows loaded silently)."""
    import torch
    from diffusers import FluxPipeline, StableDiffusionPipeline
    from safetensors.torch import save_file

    from sketch2real.cli import UserError
    from sketch2real.family import load_textual_inversion

    sdxl, sd3 = tmp_path / "sdxl.safetensors", tmp_path / "sd3.safetensors"
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)}, str(sdxl), metadata={"token": "<s>"})
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8), "t5": torch.zeros(1, 8)}, str(sd3),
              metadata={"token": "<s>"})
    with pytest.raises(UserError, match="holds clip_g, clip_l: an embedding of a model with several text encoders"):
        load_textual_inversion(StableDiffusionPipeline.from_pretrained(tiny_models.sd), str(sdxl))
    flux = FluxPipeline.from_pretrained(tiny_models.flux)
    with pytest.raises(UserError, match="holds 'clip_g', for an encoder a flux model does not have"):
        load_textual_inversion(flux, str(sd3))
    assert "<s>" not in flux.tokenizer.get_added_vocab()


def test_a_lora_output_draws_with_the_vae_its_run_trained_with(tiny_models, shard_dir, tmp_path):
    """A LoRA trained with --pretrained_vae_model_name_or_path (SDXL's fp16-fix, as the README advises) was drawn by
    generate.py with its base model's VAE: not the images the card's diffusers lines (vae=...) give. The run's VAE
    comes from its run_config.json; two runs behind one generation with other VAEs are one line."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from sketch2real.cli import UserError
    from sketch2real.generation import trained_vae

    vae = AutoencoderKL.from_pretrained(tiny_models.sd, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.3)  # another VAE: brighter images
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "lora"
    run_script("train/dreambooth.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
               "--instance_category", "cat", "--instance_prompt", "a sks sketch of a cat", "--resolution", "64",
               "--max_train_steps", "1", "--lora_rank", "4", "--validation_steps", "0", "--checkpointing_steps", "0",
               "--report_to", "none", "--pretrained_vae_model_name_or_path", tmp_path / "vae", "--output_dir", out)
    run_script("infer/generate.py", "--pretrained_model_name_or_path", out, "--prompts", "a sks sketch of a cat",
               "--height", "64", "--width", "64", "--num_inference_steps", "3", "--output_dir", tmp_path / "gen")
    row = json.loads((tmp_path / "gen" / "index.jsonl").read_text().splitlines()[0])
    drawn = np.asarray(Image.open(tmp_path / "gen" / row["image"]), dtype=int)
    settings = {k: row["settings"][k] for k in ("height", "width", "num_inference_steps", "guidance_scale")}
    for with_vae in (True, False):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd, safety_checker=None,
                                                       **({"vae": AutoencoderKL.from_pretrained(tmp_path / "vae")} if with_vae else {}))
        pipe.load_lora_weights(out)
        image = pipe(prompt=row["prompt"], generator=torch.Generator().manual_seed(row["generator_seed"]), **settings).images[0]
        assert (np.abs(np.asarray(image, dtype=int) - drawn).max() <= 1) == with_vae
    other = tmp_path / "other"
    other.mkdir()
    (other / "run_config.json").write_text(json.dumps({"pretrained_vae_model_name_or_path": "org/another-vae"}))
    with pytest.raises(UserError, match="trained with different VAEs"):
        trained_vae([str(out), str(other)])


def test_sd3_controlnet_images_are_a_function_of_their_seed(tiny_models):
    """SD3's ControlNet pipeline draws its control image's latents from torch's global RNG, `generator` aside: two
    runs of one seed gave other images (12-16 levels apart), and 1 and 2 processes others again. Each image's draws
    now come from its own seed."""
    import diffusers
    import numpy as np
    import torch

    from sketch2real.family import FAMILIES
    from sketch2real.generation import Item, generate_batch
    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import init_controlnet

    family = FAMILIES["sd3"]
    controlnet = init_controlnet(load_sd_components(str(tiny_models.sd3)).denoiser, seed=0, family=family)
    with torch.no_grad():  # a trained ControlNet: its zero-initialised layers (input and outputs) are not zero any more
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    pipe = getattr(diffusers, family.controlnet_pipeline).from_pretrained(tiny_models.sd3, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    batch = [Item("a", "a photo of a cat"), Item("b", "a photo of an apple")]
    sketches = [Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")) for i in range(2)]
    settings = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 3.0}
    drawn = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # what other code did to the global RNG before
        drawn.append([np.asarray(image) for image in generate_batch(pipe, batch, 0, settings, sketches)])
    assert all((a == b).all() for a, b in zip(*drawn))
    alone = generate_batch(pipe, batch[1:], 0, settings, sketches[1:])[0]  # in another batch: the same image
    assert np.abs(np.asarray(alone, dtype=int) - drawn[0][1]).max() <= 1


def test_a_prompts_file_is_read_a_prompt_a_line_and_an_empty_split_is_one_line(shard_dir, tmp_path):
    """`--prompts prompts.txt` drew one image of the words "prompts.txt"; a template over a split without samples
    wrote an empty index and exited 0, as a finished job."""
    import shutil

    from sketch2real.cli import UserError, parse_options
    from sketch2real.generation import GenerateOptions, build_items

    common = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out")]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sketch of a cat\n\n  a photo of a dog  \n")
    items = build_items(parse_options(GenerateOptions, [*common, "--prompts", str(prompts)]))
    assert [it.prompt for it in items] == ["a sketch of a cat", "a photo of a dog"]
    (tmp_path / "MORE.TXT").write_text("a sketch of a cow\n")
    assert [it.prompt for it in build_items(parse_options(GenerateOptions, [*common, "--prompts", str(prompts),
                                                                            str(tmp_path / "MORE.TXT")]))] \
        == ["a sketch of a cat", "a photo of a dog", "a sketch of a cow"]
    assert [it.prompt for it in build_items(parse_options(GenerateOptions, [*common, "--prompts", "a cat", "b.txt"]))] \
        == ["a cat", "b.txt"]  # prompts beside: prompts, as written
    with pytest.raises(UserError, match="prompts.txt is a file given beside prompts"):  # unless it is a file
        build_items(parse_options(GenerateOptions, [*common, "--prompts", str(prompts), "a dog"]))
    with pytest.raises(UserError, match="--prompts .*missing.txt: no such file"):
        build_items(parse_options(GenerateOptions, [*common, "--prompts", str(tmp_path / "missing.txt")]))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="blank.txt: the file holds no prompt"):
        build_items(parse_options(GenerateOptions, [*common, "--prompts", str(tmp_path / "blank.txt")]))
    # Windows editors: a BOM first (it was three odd tokens of the first prompt), CRLF lines; UTF-16 is one line
    (tmp_path / "notepad.txt").write_bytes("a cat\r\na dog\r\n".encode("utf-8-sig"))
    assert [it.prompt for it in build_items(parse_options(GenerateOptions, [*common, "--prompts",
                                                                            str(tmp_path / "notepad.txt")]))] == ["a cat", "a dog"]
    (tmp_path / "unicode.txt").write_bytes("a cat\n".encode("utf-16"))
    with pytest.raises(UserError, match="unicode.txt: not UTF-8 text .*: save it as UTF-8"):
        build_items(parse_options(GenerateOptions, [*common, "--prompts", str(tmp_path / "unicode.txt")]))

    empty = tmp_path / "shards"
    shutil.copytree(shard_dir, empty)
    index = json.loads((empty / "test.json").read_text())
    (empty / "test.json").write_text(json.dumps({**index, "shards": []}))
    with pytest.raises(UserError, match=f"split 'test' of {empty} has no samples to draw"):
        build_items(parse_options(GenerateOptions, [*common, "--shard_dir", str(empty), "--prompt_template", "a {category}"]))


def test_an_empty_caption_trains_the_template_and_is_said_in_training_and_generation(tmp_path, caplog):
    """BLIP-2 answers some questions with "": training silently used the template for it while counting the image as
    captioned, and generation drew it unconditional without a word. Both say so now, and a caption's surrounding
    spaces (Qwen tokenizes " a cat " apart from "a cat") are dropped by both."""
    from sketch2real.generation import items_from_captions
    from sketch2real.training.prompts import SamplePrompts

    path = tmp_path / "captions.jsonl"
    rows = [("cat/a", " a cat "), ("cat/b", ""), ("dog/c", "  ")]
    path.write_text("".join(json.dumps({"key": k, "category": k.split("/")[0], "prompt_id": "1", "caption": c}) + "\n"
                            for k, c in rows))
    with caplog.at_level("INFO", logger="sketch2real"):
        prompts = SamplePrompts.load("a sketch of a {category}", str(path))
        prompts.check_covers(["cat/a", "cat/b", "dog/c"], "instance images")
    assert [prompts(k, k.split("/")[0]) for k, _ in rows] == ["a cat", "a sketch of a cat", "a sketch of a dog"]
    assert "2 captions in" in caplog.text and "train with the template" in caplog.text
    assert "captions for 1 of 3 instance images" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sketch2real"):
        items = items_from_captions(str(path), None)
    assert [it.prompt for it in items] == ["a cat", "", ""]
    assert "2 captions in" in caplog.text and "an empty prompt (unconditional)" in caplog.text


def test_training_and_generation_templates_fill_in_their_fields_as_they_are():
    """One check for both: `{category.upper}` trained "a <built-in method upper of str object at 0x...> sketch" (the
    training check only tried to format), and generation let `{category!r}` quote the words."""
    from sketch2real.cli import UserError
    from sketch2real.generation import check_generation_template
    from sketch2real.training.prompts import check_prompt_template

    check_prompt_template("a {category} in the style of {{sks}}", "--instance_prompt")
    check_generation_template("a {caption}, {category} ({key})")
    check_generation_template("a {{caption}} of a {category}", {"category", "key"})  # literal: no --captions needed
    for bad in ("a {category.upper} sketch", "a {category[0]}", "a {category!r}", "a {category:>9}", "a {} sketch",
                "a {cat}", "a {category"):
        with pytest.raises(UserError, match="--instance_prompt .*(cannot be filled in|a literal brace)"):
            check_prompt_template(bad, "--instance_prompt")
        with pytest.raises(UserError, match="--prompt_template "):
            check_generation_template(bad)
