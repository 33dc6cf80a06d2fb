"""Options every trainer shares, named as in diffusers' example scripts."""

from __future__ import annotations

from dataclasses import dataclass

from sketch2real.cli import UserError, option


@dataclass(kw_only=True)
class TrainOptions:
    """Shared trainer options (model, data, optimisation, precision, checkpoints, validation)."""

    pretrained_model_name_or_path: str = option("", help="base model, SD 1.x/2.x or SDXL (read from its model_index.json): "
                                                         "hub id or local folder (required)")
    revision: str | None = option(None, help="model revision on the hub")
    pretrained_vae_model_name_or_path: str = option("", help="another VAE (e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own "
                                                             "VAE overflows in fp16)")
    variant: str | None = option(None, help="weight variant, e.g. fp16")
    output_dir: str = option("", help="where checkpoints, logs and the trained model go (required)")
    seed: int = option(0, help="global seed: data order, noise and validation images derive from it")
    shard_dir: str = option("", help="folder of webdataset shards from data_prep/make_shards.py")
    split: str = option("train", help="shard split to train on")
    validation_split: str = option("val", help="shard split for the held-out denoising loss")
    resolution: int = option(512, help="training resolution in pixels")
    train_batch_size: int = option(1, help="batch size per device")
    max_train_steps: int = option(400, help="optimizer steps to train")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    learning_rate: float = option(5e-6, help="initial learning rate (after warmup)")
    scale_lr: bool = option(False, help="multiply the learning rate by devices x batch x accumulation")
    lr_scheduler: str = option("constant", help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")
    lr_warmup_steps: int = option(0, help="warmup steps of the learning-rate schedule")
    lr_num_cycles: int = option(1, help="cycles of cosine_with_restarts")
    lr_power: float = option(1.0, help="power of the polynomial schedule")
    use_8bit_adam: bool = option(False, help="8-bit AdamW from bitsandbytes")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.999, help="AdamW beta2")
    adam_weight_decay: float = option(1e-2, help="AdamW weight decay")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon")
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)")
    mixed_precision: str | None = option(None, help="no, fp16 or bf16 (fp16 needs CUDA); default: accelerate's setting "
                                         "(config file, accelerate launch --mixed_precision, ACCELERATE_MIXED_PRECISION), else no")
    allow_tf32: bool = option(False, help="allow TF32 matmuls on Ampere and newer GPUs")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward to save memory")
    enable_xformers_memory_efficient_attention: bool = option(False, help="xformers attention (CUDA only; SDPA is the default)")
    set_grads_to_none: bool = option(True, help="free gradients between steps instead of zeroing them")
    cache_latents: bool = option(True, help="encode each training image with the VAE once per run, not every step (same "
                                            "training: the posterior is sampled with each step's noise); off: --cache_latents false")
    dataloader_num_workers: int | None = option(None, help="processes per trainer decoding images ahead of the step (0: in "
                                                "the trainer; default: up to 4 of the CPU cores left after one per process)")
    snr_gamma: float = option(0.0, help="Min-SNR loss weighting gamma (0: off; 5.0 is the paper's value)")
    noise_offset: float = option(0.0, help="offset noise scale (0: off; ~0.05-0.1 helps very dark/bright images)")
    checkpointing_steps: int = option(500, help="save a resumable checkpoint every N steps (0: only at preemption)")
    checkpoints_total_limit: int | None = option(3, help="keep at most this many checkpoints (0: keep all)")
    resume_from_checkpoint: str | None = option(None, help="'latest' or a checkpoint folder")
    validation_steps: int = option(100, help="run validation every N steps (0: off)")
    validation_prompt: list[str] = option([], help="prompts for validation images (one mosaic row each)")
    num_validation_images: int = option(2, help="images per validation prompt")
    validation_inference_steps: int = option(25, help="denoising steps of validation images")
    num_heldout_samples: int = option(16, help="validation-split samples in the held-out denoising loss (0: off)")
    report_to: str = option("tensorboard", help="tensorboard, wandb, all or none")
    logging_dir: str = option("logs", help="tracker folder, relative to --output_dir")

    def check(self) -> None:
        """One-line errors for inconsistent values (more checks live in each trainer)."""
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.resolution % 8:
            raise UserError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 0:
            raise UserError("--checkpoints_total_limit must be >= 0 (0: keep all)")
        for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise UserError("--dataloader_num_workers must be >= 0")
        if self.report_to not in ("tensorboard", "wandb", "all", "none"):
            raise UserError(f"--report_to must be tensorboard, wandb, all or none, got {self.report_to!r}")
