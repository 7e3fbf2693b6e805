"""Step caching for SVD's UNet (DeepCache, Ma et al. 2023): an opt-in switch that trades
output fidelity for speed.

The UNet's deep levels change slowly from one denoising step to the next. Every
`interval`-th step runs the whole UNet and keeps what its deep levels hand to the last
(outermost) up block; the steps between run only the outermost level (conv_in, the first
down block, the last up block) on that kept feature. The output changes (the benchmark
measures by how much), so this is never on by default.

`StepCache` replaces the UNet's `forward` on the instance: diffusers' pipeline calls the
UNet once per denoising step (conditional and unconditional halves in one batch), so the
call count within one generation is the step index. Each of the two passes is its own
function for torch.compile: the choice between them is made outside any compiled code.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput


class StepCache:
    def __init__(self, unet, interval: int, compile: bool = False):
        # interval >= 2: checked where it is chosen (Settings, Speedups).
        self.unet, self.interval = unet, interval
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

    def _out(self, sample, hidden):
        unet = self.unet
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        return hidden.reshape(sample.shape[0], sample.shape[1], *hidden.shape[1:])

    def _full(self, sample, timestep, encoder_hidden_states, added_time_ids):
        """The whole UNet; also returns the input of the last up block (the kept feature)."""
        unet = self.unet
        hidden, context, ehs = self._embed(sample, timestep, encoder_hidden_states, added_time_ids)
        residuals = (hidden,)
        for block in unet.down_blocks:
            hidden, res = self._block(block, ehs, hidden_states=hidden, **context)
            residuals += res
        hidden = unet.mid_block(hidden_states=hidden, encoder_hidden_states=ehs, **context)
        up_factor = 2 ** unet.num_upsamplers
        forward_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        deep = None
        for i, block in enumerate(unet.up_blocks):
            last = i == len(unet.up_blocks) - 1
            res, residuals = residuals[-len(block.resnets):], residuals[:-len(block.resnets)]
            size = residuals[-1].shape[2:] if forward_size and not last else None
            if last:
                deep = hidden
            hidden = self._block(block, ehs, hidden_states=hidden, res_hidden_states_tuple=res,
                                 upsample_size=size, **context)
        return self._out(sample, hidden), deep

    def _shallow(self, sample, timestep, encoder_hidden_states, added_time_ids, deep):
        """Only the outermost level, on the deep feature kept by the last full pass."""
        unet = self.unet
        hidden, context, ehs = self._embed(sample, timestep, encoder_hidden_states, added_time_ids)
        last = unet.up_blocks[-1]
        _, res = self._block(unet.down_blocks[0], ehs, hidden_states=hidden, **context)
        # The last up block takes the first residuals: conv_in's output and the first down
        # block's outputs before its downsampler.
        residuals = ((hidden,) + res)[:len(last.resnets)]
        hidden = self._block(last, ehs, hidden_states=deep, res_hidden_states_tuple=residuals, **context)
        return self._out(sample, hidden)
