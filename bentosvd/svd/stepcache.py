"""Step caching for SVD's UNet (DeepCache, Ma et al. 2023): an opt-in switch that trades
output fidelity for speed.

The UNet's deep levels change slowly from one denoising step to the next. Every
`interval`-th step runs the whole UNet and keeps what its deep levels hand to the last
(outermost) up block; the steps between run only the outermost level (conv_in, the first
down block, the last up block) on that kept feature. The output changes (the benchmark
measures by how much), so this is never on by default.

`layers` moves the kept feature further out, as DeepCache's choice of branch does: the
steps between then run only the last `layers` layers of the last up block (and, for the
skip connections those take, conv_in and the first `layers - 1` layers of the first down
block). SVD's outermost level, with its 9216-token attention at 576x1024, is much of a
whole step's work, so a shallow step that runs all of it saves only part of a step
(docs/performance.md, STEP_CACHE and STEP_CACHE_LAYERS); with `layers=1` it is conv_in,
one layer and conv_out. Fewer layers: faster, and the video changes more. 0 (the
default): the whole outermost level.

`StepCache` replaces the UNet's `forward` on the instance: diffusers' pipeline calls the
UNet once per denoising step (conditional and unconditional halves in one batch), so the
call count within one generation is the step index. Each of the two passes is its own
function for torch.compile: the choice between them is made outside any compiled code.
The layers are called one by one, as the blocks' own forwards call them, so the compiled
blocks (`compile_regions`) serve both passes.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionOutput,
)


class StepCache:
    def __init__(self, unet, interval: int, compile: bool = False, layers: int = 0):
        # interval >= 2: checked where it is chosen (Settings, Speedups).
        last = unet.up_blocks[-1]
        if getattr(last, "upsamplers", None) is not None:
            raise ValueError("step caching needs a UNet whose last up block does not upsample")
        available = len(last.resnets)
        if not 0 <= layers <= available:
            raise ValueError(f"step_cache_layers must be 1-{available} for this UNet (its last up "
                             f"block has {available} layers), or 0 for all of them; got {layers}")
        self.unet, self.interval = unet, interval
        self.layers = layers or available
        # The last up block's layers a shallow step runs; the whole step runs the others
        # first and keeps what the first of these gets.
        self.outer = range(available - self.layers, available)
        self.calls, self.deep = 0, None
        self.full, self.shallow = self._full, self._shallow
        if compile:
            self.full = torch.compile(self._full, dynamic=False)
            self.shallow = torch.compile(self._shallow, dynamic=False)
        unet.forward = self

    def reset(self) -> None:
        """Forget the kept feature: the next call runs the whole UNet (a new generation)."""
        self.calls, self.deep = 0, None

    def __call__(self, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
        if self.deep is None or self.calls % self.interval == 0:
            out, self.deep = self.full(sample, timestep, encoder_hidden_states, added_time_ids)
        else:
            out = self.shallow(sample, timestep, encoder_hidden_states, added_time_ids, self.deep)
        self.calls += 1
        return UNetSpatioTemporalConditionOutput(sample=out) if return_dict else (out,)

    # The two passes follow diffusers' UNetSpatioTemporalConditionModel.forward.

    def _embed(self, sample, timestep, encoder_hidden_states, added_time_ids):
        unet = self.unet
        batch, frames = sample.shape[:2]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        t_emb = unet.time_proj(timestep.expand(batch)).to(dtype=sample.dtype)
        emb = unet.time_embedding(t_emb)
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = (emb + unet.add_embedding(time_embeds)).repeat_interleave(frames, dim=0)
        context = dict(temb=emb, image_only_indicator=torch.zeros(batch, frames, dtype=sample.dtype,
                                                                 device=sample.device))
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(frames, dim=0)
        return unet.conv_in(sample.flatten(0, 1)), context, encoder_hidden_states

    def _block(self, block, encoder_hidden_states, **kwargs):
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        return block(**kwargs)

    def _layer(self, block, i, hidden, ehs, context):
        """Layer i (a ResNet block, then its transformer if it has one) of a block, as the
        block's own forward runs it."""
        hidden = block.resnets[i](hidden, context["temb"],
                                  image_only_indicator=context["image_only_indicator"])
        if hasattr(block, "attentions"):
            hidden = block.attentions[i](hidden, encoder_hidden_states=ehs, return_dict=False,
                                         image_only_indicator=context["image_only_indicator"])[0]
        return hidden

    def _last_up(self, layers, hidden, residuals, ehs, context):
        """These layers of the last up block; each takes the last of `residuals` (popped)."""
        last = self.unet.up_blocks[-1]
        for i in layers:
            hidden = torch.cat([hidden, residuals.pop()], dim=1)
            hidden = self._layer(last, i, hidden, ehs, context)
        return hidden

    def _out(self, sample, hidden):
        unet = self.unet
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        return hidden.reshape(sample.shape[0], sample.shape[1], *hidden.shape[1:])

    def _full(self, sample, timestep, encoder_hidden_states, added_time_ids):
        """The whole UNet; also returns the input of the first layer the shallow pass runs
        (the kept feature)."""
        unet = self.unet
        hidden, context, ehs = self._embed(sample, timestep, encoder_hidden_states, added_time_ids)
        residuals = (hidden,)
        for block in unet.down_blocks:
            hidden, res = self._block(block, ehs, hidden_states=hidden, **context)
            residuals += res
        hidden = unet.mid_block(hidden_states=hidden, encoder_hidden_states=ehs, **context)
        up_factor = 2 ** unet.num_upsamplers
        forward_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        for block in unet.up_blocks[:-1]:
            res, residuals = residuals[-len(block.resnets):], residuals[:-len(block.resnets)]
            size = residuals[-1].shape[2:] if forward_size else None
            hidden = self._block(block, ehs, hidden_states=hidden, res_hidden_states_tuple=res,
                                 upsample_size=size, **context)
        residuals = list(residuals)
        deep = self._last_up(range(self.outer.start), hidden, residuals, ehs, context)
        hidden = self._last_up(self.outer, deep, residuals, ehs, context)
        return self._out(sample, hidden), deep

    def _shallow(self, sample, timestep, encoder_hidden_states, added_time_ids, deep):
        """Only the outer layers, on the feature kept by the last full pass."""
        unet = self.unet
        hidden, context, ehs = self._embed(sample, timestep, encoder_hidden_states, added_time_ids)
        # The last up block's last `layers` layers take, last first, conv_in's output and
        # the outputs of the first down block's first `layers - 1` layers.
        residuals = [hidden]
        for i in range(self.layers - 1):
            hidden = self._layer(unet.down_blocks[0], i, hidden, ehs, context)
            residuals.append(hidden)
        hidden = self._last_up(self.outer, deep, residuals, ehs, context)
        return self._out(sample, hidden)
