"""Quantized loading: a causal LM with bitsandbytes 4-bit/8-bit linear weights (the base of a QLoRA attack).

- :func:`load_quantized`: a Hugging Face folder (or hub id) loaded with ``nf4`` / ``fp4`` / ``int8`` weights,
  kept in the layout bitsandbytes trains through;
- :func:`packed_for_cpu_inference`: the 4-bit layers bitsandbytes repacked for CPU inference anyway (training
  through them gives wrong gradients), so a caller can refuse to attack them.

bitsandbytes is an optional dependency (``pip install 'tar_lightning[quant]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tar_lightning.errors import ConfigError, ModelLoadError
from tar_lightning.models.sources import NO_HUB_KERNELS

__all__ = ["load_quantized", "packed_for_cpu_inference"]


def load_quantized(
    folder: Union[str, os.PathLike],
    quantization: str,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Loads a causal LM with bitsandbytes-quantized linear weights (the base of a QLoRA attack).

    transformers' loading progress bars are left as they are; wrap the call in
    :func:`tar_lightning.evaluation.progress.quiet_hf_progress` to silence them (the red team does).

    Args:
        folder: a Hugging Face model folder (or hub id).
        quantization: ``nf4`` / ``fp4`` (4-bit, computing in ``dtype``) or ``int8``.
        dtype: dtype of the non-quantized weights and of 4-bit compute.
        device: where the model is put (``device_map={"": device}``; ``cpu`` works with bitsandbytes >= 0.45).

    Raises:
        ConfigError: bitsandbytes missing or an unknown quantization.
        ModelLoadError: the folder cannot be loaded.
    """
    try:
        import bitsandbytes  # noqa: F401  (optional dependency: the quant extra)
    except ImportError as err:
        raise ConfigError(
            f"a quantized-base (QLoRA) attack needs bitsandbytes: pip install 'tar_lightning[quant]' ({err})"
        ) from err
    if quantization in ("nf4", "fp4"):
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype
        )
    elif quantization == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ConfigError(f"unknown quantization {quantization!r}; expected 'nf4', 'fp4' or 'int8'")
    local = Path(os.fspath(folder)).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(folder),
            quantization_config=qconfig,
            device_map={"": str(device)},
            dtype=dtype,
            local_files_only=local,
            **NO_HUB_KERNELS,
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ModelLoadError(f"cannot load {os.fspath(folder)!r} quantized ({quantization}): {err}") from err
    model.config.use_cache = False
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference at the first eval-mode
    # forward and from then on computes through a kernel without autograd: later training gets silently wrong
    # gradients (the same trap as training a 4-bit model on CPU after generate()). Keep the trainable layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def packed_for_cpu_inference(model: nn.Module) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes repacked for CPU inference (not trainable through)."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(
            getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False
        )
    ]
