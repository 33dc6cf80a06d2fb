"""The family registry: the one switch between model families."""

import json

import pytest
import torch

from sketch2real.cli import UserError
from sketch2real.family import FAMILIES, FLUX2_KLEIN, SD, SDXL, family_of, family_of_class


@pytest.mark.parametrize("class_name, family", [
    ("StableDiffusionPipeline", SD), ("StableDiffusionInpaintPipeline", SD), ("StableDiffusionXLPipeline", SDXL),
    ("StableDiffusionXLImg2ImgPipeline", SDXL), ("StableDiffusionXLControlNetPipeline", SDXL),
    ("Flux2KleinPipeline", FLUX2_KLEIN),
])
def test_pipeline_classes_map_to_their_family(class_name, family):
    assert family_of_class(class_name) is family


@pytest.mark.parametrize("class_name", ["QwenImagePipeline", "Flux2Pipeline", ""])
def test_a_model_of_another_family_is_refused_in_one_line_naming_the_supported_ones(tmp_path, class_name):
    """(Before the registry, anything not 'XL' was trained as SD 1.x.)"""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(UserError) as err:
        family_of(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert all(f"{f.name} ({f.pipeline})" in message for f in FAMILIES.values())


def test_textual_inversion_files_take_the_family_format():
    rows = [torch.zeros(2, 8), torch.ones(2, 16)]
    assert SD.learned_embeds("<s>", rows[:1]).keys() == {"<s>"}
    embeds = SDXL.learned_embeds("<s>", rows)
    assert list(embeds) == ["clip_l", "clip_g"] and embeds["clip_g"] is rows[1]
    assert SDXL.generation_kwargs() == {"original_size": (256, 256), "crops_coords_top_left": (0, 0)}
    assert SD.generation_kwargs() == {}


def test_a_vae_of_another_family_is_one_line_before_training(tiny_models):
    """--pretrained_vae_model_name_or_path of an SD3 VAE (16 latent channels) for an SD model (4): one line naming both
    (it was a convolution's traceback at the first step); the model's own VAE, given as another, loads."""
    from sketch2real.models import load_other_vae

    with pytest.raises(UserError, match=r"makes 16-channel latents, .*'s own VAE 4: a VAE of another model family"):
        load_other_vae(SD, str(tiny_models.sd3 / "vae"), str(tiny_models.sd))
    assert load_other_vae(SD, str(tiny_models.sd / "vae"), str(tiny_models.sd)).config.latent_channels == 4


def test_a_zero_terminal_snr_model_validates_on_the_schedule_it_trains_on():
    """PNDM has no `rescale_betas_zero_snr`: a zero-SNR v-prediction model's validation images were drawn from the
    plain schedule (its last alpha-bar 0.0047, not 0)."""
    from diffusers import DDPMScheduler

    plain = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    zero = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                         prediction_type="v_prediction")
    assert zero.alphas_cumprod[-1] == 0
    validation = SD.validation_scheduler(zero)
    assert torch.allclose(validation.alphas_cumprod, zero.alphas_cumprod) and validation.config.timestep_spacing == "trailing"
    assert type(SD.validation_scheduler(plain)).__name__ == "PNDMScheduler"
