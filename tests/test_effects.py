"""The tiny base that has learned (sketch2real.pretrain), trained once per test session, shorter than the
demo's (~1.5 min on one worker): it beats random weights on held-out data and follows its prompt."""

import json

import pytest
import torch


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory):
    from sketch2real.pretrain import PretrainSettings, pretrain_tiny_sd

    settings = PretrainSettings(photos_per_category=24, vae_steps=200, unet_steps=400)
    return pretrain_tiny_sd(tmp_path_factory.mktemp("pretrained") / "tiny-sd-trained", settings, progress=False)


def test_the_tiny_base_has_learned_and_loads_in_plain_diffusers(trained_base):
    from diffusers import StableDiffusionPipeline

    record = json.loads((trained_base / "pretrain.json").read_text())
    assert record["heldout_denoising_loss"] < 0.2 * record["random_base_heldout_denoising_loss"]
    pipe = StableDiffusionPipeline.from_pretrained(trained_base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def mean_image(prompt):
        generators = [torch.Generator().manual_seed(i) for i in range(4)]
        return pipe([prompt] * 4, num_inference_steps=20, guidance_scale=4, generator=generators, output_type="pt").images.mean(0)

    sketch, photo = mean_image("a sketch of an apple"), mean_image("a photo of an apple")
    assert sketch.mean() > photo.mean() + 0.05  # sketches are strokes on white: brighter
    assert sketch.std(0).mean() < photo.std(0).mean()  # and grey, where photos are coloured
