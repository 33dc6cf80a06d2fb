"""Options every trainer shares, named as in diffusers' example scripts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from sketch2real.cli import PRECISION_HELP, UserError, default_of, on_other_rank, option

if TYPE_CHECKING:
    from sketch2real.family import Family

logger = logging.getLogger("sketch2real")

# diffusers.optimization.SchedulerType values get_scheduler can build from these options alone
# (piecewise_constant also needs step rules, which no option gives).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
POLYNOMIAL_LR_END = 1e-7  # get_scheduler's default end of the polynomial schedule: the learning rate must exceed it

PRODIGY_LR = 1.0  # Prodigy finds the step size; the learning rate scales it

_SHARDS = "datasets are read from webdataset shards: give --shard_dir (data_prep/make_shards.py makes Sketchy's)"
_STEPS = ("give --max_train_steps (optimizer steps; a pass over N images is ceil(N / (train_batch_size x processes "
          "x gradient_accumulation_steps)) steps)")
# diffusers' example scripts' flags a copied command may carry that the trainers do not take: what to give instead
# (said after argparse's "unrecognized arguments", and for a config file's unknown options)


def flags_not_taken(image_folder_flag: str, *taken: str, **trainer_own: str) -> dict[str, str]:
    """`FLAGS_NOT_TAKEN` for a trainer: its dataset flags pointing also to its folder of images (`image_folder_flag`),
    without the flags it takes (that one and `taken`), with the advice only its flags can give (`trainer_own`)."""
    data = f"{_SHARDS}, or your own images: {image_folder_flag} FOLDER"
    table = {**FLAGS_NOT_TAKEN, **{k: data for k, v in FLAGS_NOT_TAKEN.items() if v == _SHARDS}, **trainer_own}
    return {k: v for k, v in table.items() if k not in (image_folder_flag[2:], *taken)}


FLAGS_NOT_TAKEN = {
    **dict.fromkeys(("dataset_name", "dataset_config_name", "image_column", "caption_column", "cache_dir",
                     "conditioning_image_column", "jsonl_for_train", "max_train_samples", "train_data_dir",
                     "instance_data_dir"), _SHARDS),
    "num_train_epochs": _STEPS,
    "repeats": _STEPS + " (repeats only lengthen diffusers' epochs)",
    **dict.fromkeys(("center_crop", "random_flip", "image_interpolation_mode"),
                    "no flips or random crops: shard images are resized to --resolution whole (Sketchy's are "
                    "square); a folder of images given instead of shards is center-cropped to a square"),
    "tokenizer_name": "the tokenizers are read from --pretrained_model_name_or_path",
    "hub_token": "log in with `hf auth login` or set HF_TOKEN (a token on the command line is visible on the node)",
    "local_rank": "launch with `accelerate launch` (or slurm/*.sh), which gives each process its rank",
    "offset_noise": "give --noise_offset 0.1 (the offset diffusers' train_dreambooth.py adds)",
    "validation_epochs": "give --validation_steps",
    "save_steps": "give --checkpointing_steps (each checkpoint can be resumed and converted)",
    "no_safe_serialization": "weights are written as safetensors only",
    "validation_scheduler": "validation samples with the model's own scheduler",
    "enable_npu_flash_attention": "Ascend NPUs are not supported",
    "upcast_before_saving": "not needed: trained weights are saved in fp32 (the optimizer's master weights)",
    "input_perturbation": "not supported (train_text_to_image.py's noise perturbation); --noise_offset is taken",
    **dict.fromkeys(("tokenizer_max_length", "text_encoder_use_attention_mask"),
                    "a DeepFloyd IF setting; prompts are tokenized as each model's own pipeline tokenizes them"),
}


@dataclass(kw_only=True, frozen=True)
class TrainOptions:
    """Shared trainer options (model, data, optimisation, precision, checkpoints, validation)."""

    FLAGS_NOT_TAKEN: ClassVar[dict[str, str]] = FLAGS_NOT_TAKEN

    pretrained_model_name_or_path: str = option("", help="base model: SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 or FLUX.2 [klein] "
                                                         "(the family is read from its model_index.json): "
                                                         "hub id or local folder (required)")
    revision: str | None = option(None, help="model revision on the hub")
    pretrained_vae_model_name_or_path: str = option("", help="another VAE (e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own "
                                                             "VAE overflows in fp16)")
    variant: str | None = option(None, help="weight variant, e.g. fp16")
    output_dir: str = option("", help="where checkpoints, logs and the trained model go (required)", affects="runtime")
    seed: int = option(0, help="global seed: data order, noise and validation images derive from it", min=0)
    shard_dir: str = option("", help="folder of webdataset shards from data_prep/make_shards.py")
    split: str = option("train", help="shard split to train on")
    validation_split: str = option("val", help="shard split for the held-out denoising loss")
    resolution: int | None = option(None, help="training resolution in pixels; default: the family's, as diffusers' "
                                               "scripts (SDXL: 1024; SD 1.x/2.x, SD3, FLUX: 512); SD3 and FLUX take "
                                               "a multiple of 16", min=8, multiple_of=8)
    train_batch_size: int = option(1, help="batch size per device", min=1, affects="runtime")
    max_train_steps: int = option(400, help="optimizer steps to train", min=1, affects="runtime")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step", min=1)
    learning_rate: float | None = option(None, help="initial learning rate (after warmup); default: the trainer's "
                                                    "(`default_learning_rate`), 1.0 with --optimizer prodigy",
                                         min_exclusive=0)
    scale_lr: bool = option(False, help="multiply the learning rate by devices x batch x accumulation")
    lr_scheduler: str = option("constant", help="learning-rate schedule (diffusers' get_scheduler)", choices=LR_SCHEDULERS,
                               noun="learning-rate scheduler")
    lr_warmup_steps: int = option(0, help="warmup steps of the learning-rate schedule", min=0)
    lr_num_cycles: int = option(1, help="cycles of cosine_with_restarts", min=1)
    lr_power: float = option(1.0, help="power of the polynomial schedule", min_exclusive=0)
    optimizer: str = option("adamw", help="adamw; prodigy (Prodigy estimates its own step size: --learning_rate 1.0 "
                                          "scales it; prodigyopt); or adamw_schedulefree (schedule-free AdamW: no "
                                          "schedule, validation and the saved model use its average, --lr_warmup_steps "
                                          "is its warm-up; schedulefree)",
                            choices=("adamw", "prodigy", "adamw_schedulefree"), noun="optimizer", case_insensitive=True)
    prodigy_beta3: float | None = option(None, help="Prodigy's beta3 for its step-size estimate (default: sqrt(beta2))",
                                         min=0, max_exclusive=1)
    prodigy_decouple: bool = option(True, help="Prodigy: AdamW-style decoupled weight decay")
    prodigy_use_bias_correction: bool = option(True, help="Prodigy: Adam's bias correction")
    prodigy_safeguard_warmup: bool = option(True, help="Prodigy: no step-size growth from warm-up's small steps")
    use_8bit_adam: bool = option(False, help="8-bit AdamW from bitsandbytes")
    use_ema: bool = option(False, help="keep an exponential moving average of the trained weights (fp32, sharded as the "
                                       "optimizer's masters under ZeRO): validation uses it and --output_dir gets it, "
                                       "the trained weights go to OUTPUT_DIR/without_ema")
    ema_decay: float = option(0.9999, help="EMA decay; the k-th step averages with min(decay, k / (k + 9)), as diffusers' "
                                           "EMAModel", min=0, max_exclusive=1)
    adam_beta1: float = option(0.9, help="AdamW beta1", min=0, max_exclusive=1)
    adam_beta2: float = option(0.999, help="AdamW beta2", min=0, max_exclusive=1)
    adam_weight_decay: float = option(1e-2, help="AdamW weight decay", min=0)
    adam_epsilon: float = option(1e-8, help="AdamW epsilon", min_exclusive=0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)", min=0)
    mixed_precision: str | None = option(None, help=PRECISION_HELP, choices=("no", "fp16", "bf16"), affects="runtime")
    allow_tf32: bool = option(False, help="allow TF32 matmuls on Ampere and newer GPUs", affects="runtime")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward to save memory", affects="runtime")
    enable_xformers_memory_efficient_attention: bool = option(False, help="xformers attention (CUDA only; SDPA is the default)",
                                                              affects="runtime")
    set_grads_to_none: bool = option(True, help="free gradients between steps instead of zeroing them", affects="runtime")
    cache_latents: bool = option(True, help="encode each training image with the VAE once per run, not every step (same "
                                            "training: the posterior is sampled with each step's noise); off: --cache_latents false",
                                            affects="runtime")
    latent_cache_dir: str = option("", help="folder of the on-disk latent cache (and DreamBooth's stored prompt "
                                   "encodings) of large training sets: "
                                   "encoded once by all ranks, reused by later runs with the same VAE, resolution and "
                                   "images; put it on storage every node sees (default: OUTPUT_DIR/latent_cache)", affects="runtime")
    dataloader_num_workers: int | None = option(None, help="processes per trainer decoding images ahead of the step (0: in "
                                                "the trainer; default: up to 4 of the CPU cores left after one per process)",
                                                min=0, affects="runtime")
    snr_gamma: float = option(0.0, help="Min-SNR loss weighting gamma (0: off; 5.0 is the paper's value)", min=0)
    weighting_scheme: str = option("none", help="flow-matching families (SD3, FLUX.1, FLUX.2 [klein]): timestep density and loss weighting, as "
                                   "diffusers' SD3/FLUX scripts (logit_normal, mode: density; sigma_sqrt, cosmap: weighting; "
                                   "none: uniform, unweighted)",
                                   choices=("sigma_sqrt", "logit_normal", "mode", "cosmap", "none"), noun="weighting scheme")
    logit_mean: float = option(0.0, help="mean of the logit_normal timestep density", min=-10, max=10)
    logit_std: float = option(1.0, help="standard deviation of the logit_normal timestep density", min_exclusive=0)
    mode_scale: float = option(1.29, help="scale of the mode timestep density", min=0, max=2)
    guidance_scale: float = option(3.5, help="guidance-distilled models (FLUX.1 [dev]): the guidance value the transformer "
                                   "is given in training, as diffusers' FLUX scripts (ignored by other models)", min=0)
    max_sequence_length: int | None = option(None, help="SD3, FLUX.1, FLUX.2 [klein]: prompt tokens of the T5/Qwen "
                                             "encoder, at training, validation and (recorded in run_config.json) "
                                             "generation; longer captions are cut there (default: diffusers' scripts': "
                                             "SD3 77, FLUX 512; their pipelines take at most 512)", min=1, max=512)
    noise_offset: float = option(0.0, help="offset noise scale (0: off; ~0.05-0.1 helps very dark/bright images)", min=0)
    checkpointing_steps: int = option(500, help="save a resumable checkpoint every N steps (0: only at preemption)", min=0,
                                      affects="runtime")
    checkpoints_total_limit: int | None = option(3, help="keep at most this many checkpoints (0: keep all)", min=0, affects="runtime")
    resume_from_checkpoint: str | None = option(None, help="'latest' or a checkpoint folder", affects="runtime")
    validation_steps: int = option(100, help="run validation every N steps (0: off)", min=0,
                                   affects="runtime")
    validation_prompt: list[str] = option([], help="prompts for validation images (one mosaic row each)",
                                          affects="runtime")
    num_validation_images: int = option(2, help="images per validation prompt (0: no validation images)", min=0, affects="runtime")
    validation_inference_steps: int = option(25, help="denoising steps of validation images", min=1, affects="runtime")
    num_heldout_samples: int = option(16, help="validation-split samples in the held-out denoising loss (0: off)", min=0, affects="runtime")
    validation_clip_model_name_or_path: str = option("", help="CLIP model (hub id or path): every validation also "
                                                     "logs its images' sketchiness (a linear probe fitted on --shard_dir's "
                                                     "train split, sketches vs photos) and content accuracy (zero-shot "
                                                     "category), as eval/fid.py scores them; empty: off", affects="runtime")
    validation_probe_samples: int = option(200, help="sketch/photo pairs the sketchiness probe is fitted on", min=10, affects="runtime")
    ddp_timeout: int = option(7200, help="seconds a process waits in a collective before the job fails (torch's NCCL "
                              "default, 600, is shorter than rank 0 saving a full SDXL checkpoint)", min=1, affects="runtime")
    logging_steps: int = option(10, help="every N steps: read the loss back from the device, check it is finite on every "
                                "process, log it and look for a preemption signal (each read waits for the GPU: 1 "
                                "makes every step wait)", min=1, affects="runtime")
    torch_compile: bool = option(False, help="compile the denoiser (and ControlNet) with torch.compile (UNets whole; "
                                 "FLUX by repeated block: one compile per block type); the first steps pay the compile", affects="runtime")
    torch_compile_mode: str = option("default", help="torch.compile's mode with --torch_compile (reduce-overhead: CUDA "
                                     "graphs, for small batches where launching kernels is the bottleneck)",
                                     choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                                     noun="compile mode", affects="runtime")
    torch_compile_backend: str = option("inductor", help="torch.compile's backend with --torch_compile (aot_eager: "
                                        "captures and checks the graphs without generating kernels, for debugging)",
                                        choices=("inductor", "aot_eager", "eager", "cudagraphs"), noun="compile backend", affects="runtime")
    report_to: str = option("tensorboard", help="experiment tracker", choices=("tensorboard", "wandb", "all", "none"),
                            noun="tracker", affects="runtime")
    logging_dir: str = option("logs", help="tracker folder, relative to --output_dir", affects="runtime")
    tracker_project_name: str = option("", help="the tracker's project (wandb's project, TensorBoard's run folder); "
                                       "default: the trainer's name", affects="runtime")
    push_to_hub: bool = option(False, help="upload the trained model (the output folder without checkpoints and "
                               "caches) to the Hugging Face Hub at the end; the repository is created or found at the "
                               "start, so a missing login fails at once (`hf auth login` or HF_TOKEN)", affects="runtime")
    hub_model_id: str = option("", help="the hub repository with --push_to_hub: 'name' (under your user) or "
                               "'organization/name'; default: the output folder's name", affects="runtime")

    def __post_init__(self) -> None:
        # frozen: defaults that depend on other options and on the model's family, as diffusers' per-family scripts
        family = None
        if None in (self.resolution, self.learning_rate, self.adam_weight_decay) and self.pretrained_model_name_or_path:
            from sketch2real.family import family_of

            # a model that cannot be read is left to the task, which says so in one line before any weight loads
            with contextlib.suppress(UserError):
                family = family_of(self.pretrained_model_name_or_path, self.revision)
        if self.resolution is None and family is not None:
            object.__setattr__(self, "resolution", family.training_resolution)
        if self.learning_rate is None:
            learning_rate = PRODIGY_LR if self.optimizer == "prodigy" else self.default_learning_rate(family)
            object.__setattr__(self, "learning_rate", learning_rate)
        if self.adam_weight_decay is None:
            object.__setattr__(self, "adam_weight_decay", self.default_weight_decay(family))

    def default_learning_rate(self, family: Family | None) -> float:
        """The trainer's learning rate when --learning_rate is not given (and the optimizer is not Prodigy), for a
        model of `family` (None: one that cannot be read, which the task will refuse)."""
        return 5e-6

    def default_weight_decay(self, family: Family | None) -> float:
        """The AdamW weight decay of a trainer that declares it None (resolved from the family) when not given."""
        return 1e-2

    def check(self) -> None:
        """One-line errors for missing or inconsistent values (ranges and choices are declared on the options, and
        checked by `parse_options`; more checks live in each trainer)."""
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        if self.lr_scheduler == "polynomial" and self.learning_rate <= POLYNOMIAL_LR_END:
            raise UserError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_LR_END}: --learning_rate must be larger, "
                            f"got {self.learning_rate}")
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            raise UserError(f"--optimizer prodigy estimates its step size; --learning_rate scales that estimate (1.0 as "
                            f"Prodigy intends), got {self.learning_rate}")
        if (self.lr_scheduler == "constant" and self.lr_warmup_steps and self.optimizer != "adamw_schedulefree"
                and not on_other_rank()):  # a warning: a run trained so still resumes with the flag
            logger.warning("--lr_warmup_steps %d does nothing under --lr_scheduler constant (its rate is constant from "
                           "step 1): give --lr_scheduler constant_with_warmup", self.lr_warmup_steps)
        # given away from their defaults without what they tune: said (they were ignored without a word)
        needs = {"ema_decay": ("--use_ema", self.use_ema),
                 **dict.fromkeys(("logit_mean", "logit_std"), ("--weighting_scheme logit_normal",
                                                               self.weighting_scheme == "logit_normal")),
                 "mode_scale": ("--weighting_scheme mode", self.weighting_scheme == "mode"),
                 **{f.name: ("--optimizer prodigy", self.optimizer == "prodigy") for f in dataclasses.fields(self)
                    if f.name.startswith("prodigy_")}}
        unused = [f"--{f.name}: not used without {needs[f.name][0]}" for f in dataclasses.fields(self)
                  if f.name in needs and not needs[f.name][1] and getattr(self, f.name) != default_of(f)]
        if unused and not on_other_rank():
            logger.warning("; ".join(unused))
        if self.optimizer != "adamw" and self.use_8bit_adam:
            raise UserError(f"--use_8bit_adam is an AdamW: choose it or --optimizer {self.optimizer}")
        if self.optimizer == "adamw_schedulefree":
            if self.lr_scheduler not in ("constant", "constant_with_warmup"):
                raise UserError(f"--optimizer adamw_schedulefree replaces the learning-rate schedule (its average "
                                f"does what a decay would): --lr_scheduler constant, not {self.lr_scheduler} "
                                f"(--lr_warmup_steps is its warm-up)")
            if self.use_ema:
                raise UserError("--optimizer adamw_schedulefree already validates and saves an average of its "
                                "iterates: drop --use_ema")
        if self.validation_clip_model_name_or_path and not self.shard_dir:
            raise UserError("--validation_clip_model_name_or_path fits its sketchiness probe on --shard_dir's train split: "
                            "give --shard_dir")
