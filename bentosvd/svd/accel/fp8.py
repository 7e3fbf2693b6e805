"""FP8 matrix products in the UNet's transformer blocks (torchao)."""

from __future__ import annotations

import torch


def quantize_fp8(unet: torch.nn.Module, device: torch.device) -> None:
    """FP8 weights and activations (dynamic per-row scales) for the linear layers of the
    UNet's transformer blocks, where most of its matmul work is; convolutions stay fp16."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("FP8 needs an NVIDIA GPU of compute capability 8.9 or newer "
                         "(Ada, Hopper, Blackwell); turn FP8 off on this device")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )
    except ImportError as e:
        raise ValueError("FP8 needs torchao: pip install torchao==0.18.0") from e

    def in_transformer(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and "transformer_blocks" in name
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    # torchao's per-row scales take bfloat16 weights only (an fp16 UNet fails with
    # "PerRow quantization only works for bfloat16"): one scale per tensor there.
    granularity = PerRow() if unet.dtype == torch.bfloat16 else PerTensor()
    # set_inductor_config=False: by default torchao turns on Inductor's coordinate-descent
    # tuning for the whole process, which benchmarks every kernel while compiling, fp16
    # graphs as much as FP8 ones: the warm-up then never finished compiling the UNet
    # (docs/journal.md, 2026-11-27, FP8 with the compiled UNet).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity,
                                                       set_inductor_config=False)
    quantize_(unet, config, filter_fn=in_transformer)
