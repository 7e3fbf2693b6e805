"""SVD's temporal self-attention on the memory-efficient SDPA kernel.

Each temporal layer attends over the frames (25 for SVD-XT) at every position of the
latent: 18432 sequences of 25 tokens at 72x128 with guidance. cuDNN's fused attention,
which torch tries first on Hopper and which is the fastest for the spatial layers' long
sequences (faster there than FlashAttention 2), pads each of these short sequences to
its large tiles. The memory-efficient kernel's smaller tiles waste less, so the temporal
layers prefer it and the spatial ones keep cuDNN's (docs/performance.md, efficient
temporal attention).

`TemporalAttention` runs the layer's own processor with that kernel first in SDPA's
order; where it cannot run (on the CPU, say) torch takes the next one that can, as
before. Same arithmetic, another kernel: outputs differ by rounding. Inside
torch.compile the choice is made while tracing and kept in the compiled code.
"""

from __future__ import annotations

from diffusers.models.attention import TemporalBasicTransformerBlock
from torch.nn.attention import SDPBackend, sdpa_kernel

ORDER = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
         SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


class TemporalAttention:
    """A diffusers attention processor: `fallback` (the layer's own) with the memory-efficient
    kernel preferred."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, *args, **kwargs):
        with sdpa_kernel(ORDER, set_priority=True):
            return self.fallback(attn, hidden_states, *args, **kwargs)


def use_efficient_temporal_attention(model) -> int:
    """Give the self-attention of the model's temporal transformer blocks the preference;
    returns how many layers."""
    count = 0
    for module in model.modules():
        if isinstance(module, TemporalBasicTransformerBlock) and not isinstance(
                module.attn1.processor, TemporalAttention):
            module.attn1.set_processor(TemporalAttention(module.attn1.processor))
            count += 1
    return count


def remove_efficient_temporal_attention(model) -> None:
    """Give the layers their own processors back."""
    for module in model.modules():
        if isinstance(module, TemporalBasicTransformerBlock) and isinstance(
                module.attn1.processor, TemporalAttention):
            module.attn1.set_processor(module.attn1.processor.fallback)
