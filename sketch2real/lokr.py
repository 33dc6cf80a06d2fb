"""LoKr adapters in the file format the LoKr ecosystem reads, written from peft's adapters and merged back into a
denoiser for generation. Module names: LyCORIS' kohya-style `lora_unet_<module>` for UNets (ComfyUI, A1111, kohya's
scripts), SimpleTuner's `lycoris_<module>` for SD3 and FLUX.1 transformers (ComfyUI); the family says which
(`Family.lokr_prefix`), and `<module>` is diffusers' module path with "." as "_".

A module's update is kron(w1, w2) times a scale, each factor stored whole (`lokr_w1`) or as a low-rank product
(`lokr_w1_a @ lokr_w1_b`). peft scales every module by alpha / rank; the readers scale by alpha / rank only where a
factor is a product and by 1 elsewhere, so where neither factor is (small layers) the scale is folded into `lokr_w1`.
diffusers' `load_lora_weights` reads no LoKr file: generation merges it here (`merge_lokr`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sketch2real.cli import UserError

LOKR_FILE = "pytorch_lokr_weights.safetensors"
PREFIXES = ("lora_unet_", "lycoris_")  # the names' prefixes generation reads (ComfyUI reads both for a UNet)
FACTORS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


def _by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, name = key.rsplit(".", 1)
        modules.setdefault(module, {})[name] = value
    return modules


def lycoris_layers(peft_layers: dict[str, torch.Tensor], alpha: float, rank: int,
                   prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """peft's LoKr weights of a denoiser (`<module>.lokr_w1`...: `get_peft_model_state_dict`'s names) in LyCORIS'
    names (`prefix` + module), with `.alpha` per module."""
    out = {}
    for module, factors in _by_module(peft_layers).items():
        unknown = set(factors) - set(FACTORS)
        if unknown:
            raise ValueError(f"{module}: LoKr factors {sorted(unknown)} have no place in the file (Tucker/conv LoKr)")
        name = prefix + module.replace(".", "_")
        decomposed = "lokr_w1_a" in factors or "lokr_w2_a" in factors
        for factor, value in factors.items():
            scale = alpha / rank if factor == "lokr_w1" and not decomposed else 1.0
            out[f"{name}.{factor}"] = (value.float() * scale).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_lokr(folder: Path, peft_layers: dict[str, torch.Tensor], alpha: float, rank: int, targets: list[str],
               prefix: str = "lora_unet_") -> Path:
    """`folder/pytorch_lokr_weights.safetensors` with kohya's metadata (what LyCORIS writes: its module and settings)."""
    from safetensors.torch import save_file

    from sketch2real.io import atomic_path, sort_safetensors_metadata

    path = folder / LOKR_FILE
    with atomic_path(path) as tmp:
        save_file(lycoris_layers(peft_layers, alpha, rank, prefix), str(tmp), metadata={
            "format": "pt", "ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_network_args": json.dumps({"algo": "lokr", "targets": targets})})
        sort_safetensors_metadata(tmp)
    return path


def _factor(factors: dict[str, torch.Tensor], which: str) -> tuple[torch.Tensor, int | None]:
    """A factor and, if stored as a product, its rank."""
    if which in factors:
        return factors[which].float(), None
    a, b = factors[f"{which}_a"].float(), factors[f"{which}_b"].float()
    return a @ b, b.shape[0]


@torch.no_grad()
def merge_lokr(denoiser: torch.nn.Module, file: str | Path, scale: float = 1.0) -> int:
    """Add a LoKr file's updates (times `scale`) to a denoiser's weights, as ComfyUI applies them; returns the
    modules changed. A module the denoiser does not have is one line (another base model)."""
    from safetensors.torch import load_file

    modules = {prefix + name.replace(".", "_"): module for name, module in denoiser.named_modules() for prefix in PREFIXES}
    modules_in_file = _by_module(load_file(str(file)))
    for name, factors in modules_in_file.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise UserError(f"{file}: {name} is not a module of this model's {type(denoiser).__name__} (another base?)")
        w1, rank1 = _factor(factors, "lokr_w1")
        w2, rank2 = _factor(factors, "lokr_w2")
        rank = rank2 or rank1
        alpha = float(factors["alpha"]) if "alpha" in factors else None
        module_scale = alpha / rank if alpha is not None and rank is not None else 1.0
        delta = torch.kron(w1, w2).reshape(module.weight.shape) * (module_scale * scale)
        module.weight += delta.to(module.weight.device, module.weight.dtype)
    return len(modules_in_file)
