import torch
from PIL import Image


def test_tokenizer_is_real_clip_vocabulary(tmp_path):
    from sketch2real.testing.tiny import clip_tokenizer

    tokenizer = clip_tokenizer(tmp_path)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.tokenize("a sks sketch") == ["a</w>", "sks</w>", "sketch</w>"]


def test_tiny_sd_loads_offline_and_generates(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    a = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    c = pipe("a photo of a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 64, 64, 3)
    assert (a == b).all() and not (a == c).all()


def test_models_load_in_the_asked_precision_without_a_deprecation_warning(tiny_models):
    """`torch_dtype=` printed diffusers' FutureWarning at every load (each generation and eval process's log); `dtype=`
    (diffusers >= 0.40, transformers >= 5.6) loads every part in the asked precision without one."""
    import warnings

    from sketch2real.captioning import load_captioner
    from sketch2real.family import family_of
    from sketch2real.models import load_base_pipeline, load_sd_components

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = load_base_pipeline(family_of(str(tiny_models.sd)), str(tiny_models.sd), torch_dtype=torch.bfloat16,
                                  vae_name_or_path=str(tiny_models.sd / "vae"))
        parts = load_sd_components(str(tiny_models.sd), frozen_dtype=torch.float16, keep_full_precision=("denoiser",))
        captioner = load_captioner(str(tiny_models.blip2), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in parts.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in parts.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for p in captioner.model.parameters()} == {torch.bfloat16}


def test_tiny_captioners_generate(tiny_models):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    image = Image.new("RGB", (64, 64), "white")
    for path, cls, prompt in [
        (tiny_models.blip2, Blip2ForConditionalGeneration, "Question: what is drawn? Answer:"),
        (tiny_models.llava, LlavaForConditionalGeneration, "USER: <image>\nwhat is drawn?\nASSISTANT:"),
    ]:
        processor = AutoProcessor.from_pretrained(path)
        model = cls.from_pretrained(path)
        inputs = processor(images=[image, image], text=[prompt, prompt], return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        assert new_tokens.shape == (2, 5)
        assert all(isinstance(t, str) for t in processor.batch_decode(new_tokens, skip_special_tokens=True))


def test_fid_inception_file_loads_and_separates_images(tiny_models):
    from pytorch_fid.inception import InceptionV3

    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=generator)
    images[2:] *= 0.2  # darker images
    with torch.no_grad():
        features = net(images)[0].flatten(1)
    assert features.shape == (4, 2048)
    assert features.std(0).mean() > 1e-3  # not a constant vector
    assert (features[0] - features[2]).abs().mean() > (features[0] - features[1]).abs().mean()
