"""SVD's cross-attention without the attention: an exact shortcut.

SVD conditions its UNet on one CLIP image embedding, so every cross-attention layer (the
spatial `attn2` of each transformer block and the temporal one beside it) attends to a
single key/value token. The softmax over one score is exactly 1, whatever the query, so
each query's output is that token's value: `to_out(to_v(token))`, the same for every query.
The query projection, the key projection, the attention kernel and the output projection
over all tokens (and, once compiled, the LayerNorm before the layer, whose result is then
unused) compute nothing that changes the result. `SingleTokenCrossAttention` computes the
value once per batch row and broadcasts it; outputs differ from the full computation only
by the rounding of the output projection on fewer rows.

Anything else (more than one token, a mask, layers with norms or residuals of their own)
goes to the layer's own processor, unchanged.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)


class SingleTokenCrossAttention:
    """A diffusers attention processor: the shortcut where it applies, `fallback` (the
    layer's own processor) everywhere else."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if (encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1
                or attention_mask is not None or hidden_states.ndim != 3):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        value = attn.to_out[1](attn.to_out[0](attn.to_v(encoder_hidden_states)))
        return (value / attn.rescale_output_factor).expand(-1, hidden_states.shape[1], -1)


def _plain(attn: Attention) -> bool:
    """A cross-attention layer with diffusers' standard softmax attention and nothing added
    around it (no norms or residual of its own), as SVD's are."""
    return (attn.is_cross_attention and type(attn.processor) in (AttnProcessor2_0, AttnProcessor)
            and attn.spatial_norm is None and attn.group_norm is None
            and not attn.norm_cross and not attn.residual_connection)


def use_single_token_cross_attention(model: torch.nn.Module) -> int:
    """Give the model's plain cross-attention layers the shortcut; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and _plain(module):
            module.set_processor(SingleTokenCrossAttention(module.processor))
            count += 1
    return count


def remove_single_token_cross_attention(model: torch.nn.Module) -> None:
    """Give the layers their own processors back."""
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, SingleTokenCrossAttention):
            module.set_processor(module.processor.fallback)
