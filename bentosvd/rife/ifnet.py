"""RIFE 4.x's flow network (IFNet), which loads the authors' `flownet.pkl`.

RIFE (Huang et al., ECCV 2022; Practical-RIFE, both MIT) estimates, for a time t between
two frames, the flow from the in-between frame back to each of them plus a blend mask,
coarse to fine in four blocks, then warps both frames and blends them. Version 4.x takes t
as an input, so one network makes a frame at any t.

Releases 4.5 to 4.9 share the blocks written here, in three layouts (`LAYOUTS`):

- `4.6`: the common `flownet.pkl`; blocks `block0`..`block3`, no feature head.
- `4.5`: as 4.6, but each block's last layer predicts 5 channels rather than 6 (the
  sixth is unused either way).
- `4.7` (also 4.8 and 4.9, ComfyUI's `rife47` / `rife49`): the 4.6 blocks fed by a small
  feature head (`encode.*`) as well; the blocks predict the mask afresh at each level
  rather than refining it.

`load_ifnet` tells the layouts apart from the state dict. Later releases (4.10 and up)
change the head and the blocks and are refused with a ValueError. The test-time ensemble
of the authors' code is left out: 4.7 and later drop it, and it doubles the cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FULL_WIDTHS = (192, 128, 96, 64)
"""Channels of the four blocks, coarse to fine, in the authors' weights."""

DEMO_WIDTHS = (16, 16, 8, 8)
"""Channels of the demo network: the same layout, small enough for a CPU."""

FLOW_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Resolutions the flow can be estimated at, relative to the frames: 0.5 for 4K input
(large motions, fewer pixels), 1.0 otherwise."""

FEATURE_CHANNELS = 4  # what the 4.7-4.9 head makes for each frame
ENCODER_WIDTH = 16


class _Layout(NamedTuple):
    features: bool  # has the `encode` feature head
    block_outputs: int  # channels each block's last layer predicts (after pixel shuffle)


LAYOUTS = {
    "4.5": _Layout(features=False, block_outputs=5),
    "4.6": _Layout(features=False, block_outputs=6),
    "4.7": _Layout(features=True, block_outputs=6),
}
"""The layouts this module loads, each named for its first release (4.8 and 4.9 are
`4.7`'s)."""


def _conv(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(0.2, True))


class _ResConv(nn.Module):
    """A 3x3 convolution with a learned per-channel gain (`beta`) on a residual path."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class _IFBlock(nn.Module):
    """One level: at 1/scale resolution, reads the frames (and the flow so far) and predicts
    a flow update (4 channels, pixels at full resolution) and a mask (1 channel)."""

    def __init__(self, in_channels: int, width: int, outputs: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_channels, width // 2, 2), _conv(width // 2, width, 2))
        self.convblock = nn.Sequential(*(_ResConv(width) for _ in range(8)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(width, 4 * outputs, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: float):
        if scale != 1:
            x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            if scale != 1:
                flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear",
                                     align_corners=False) / scale
            x = torch.cat((x, flow), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))[:, :5]
        if scale != 1:
            out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5]


def _base_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """grid_sample's coordinates of every pixel, (1, H, W, 2), in float32."""
    xs = torch.linspace(-1.0, 1.0, width, device=device).view(1, 1, width).expand(1, height, width)
    ys = torch.linspace(-1.0, 1.0, height, device=device).view(1, height, 1).expand(1, height, width)
    return torch.stack((xs, ys), dim=-1)


def _warp(image: torch.Tensor, flow: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Samples `image` at each pixel plus `flow` (in pixels), clamping at the border."""
    # In float32 whatever the model's dtype: float16 resolves grid_sample's normalised
    # coordinates to 2**-11, a quarter pixel across a 1024-pixel row.
    height, width = image.shape[-2:]
    flow = flow.float()
    offset = torch.stack((flow[:, 0] / ((width - 1.0) / 2.0), flow[:, 1] / ((height - 1.0) / 2.0)), dim=-1)
    warped = F.grid_sample(image.float(), grid + offset, mode="bilinear", padding_mode="border",
                           align_corners=True)
    return warped.to(image.dtype)


class IFNet(nn.Module):
    """RIFE 4.x's IFNet in one of the `LAYOUTS` (`version`), with the blocks' widths given.

    Parameter names match the authors' `flownet.pkl` once its `module.` prefixes are
    stripped, so `load_state_dict` takes their weights; `load_ifnet` does that and checks
    them. `widths` is for small test networks; the authors' weights are `FULL_WIDTHS`.
    """

    def __init__(self, version: str = "4.6", widths: tuple[int, int, int, int] = FULL_WIDTHS):
        super().__init__()
        if version not in LAYOUTS:
            raise ValueError(f"version must be one of {sorted(LAYOUTS)}, got {version!r}")
        widths = tuple(widths)
        if len(widths) != 4 or not all(isinstance(w, int) and w >= 2 and w % 2 == 0 for w in widths):
            raise ValueError(f"widths must be four even integers >= 2, got {widths!r}")
        self.version = version
        self.widths = widths
        layout = LAYOUTS[version]
        features = 2 * FEATURE_CHANNELS if layout.features else 0
        # Inputs: both frames (3 + 3) and t (1), plus both frames' features; later blocks
        # also read the mask so far (1) and the flow so far (4).
        self.block0 = _IFBlock(7 + features, widths[0], layout.block_outputs)
        self.block1 = _IFBlock(12 + features, widths[1], layout.block_outputs)
        self.block2 = _IFBlock(12 + features, widths[2], layout.block_outputs)
        self.block3 = _IFBlock(12 + features, widths[3], layout.block_outputs)
        self.encode = (
            nn.Sequential(nn.Conv2d(3, ENCODER_WIDTH, 3, 2, 1),
                          nn.ConvTranspose2d(ENCODER_WIDTH, FEATURE_CHANNELS, 4, 2, 1))
            if layout.features else None
        )

    @staticmethod
    def pad_multiple(scale: float = 1.0) -> int:
        """What the frames' height and width must be a multiple of at this flow `scale`:
        the coarsest block works at 1/32 of the flow's resolution."""
        if scale not in FLOW_SCALES:
            raise ValueError(f"scale must be one of {FLOW_SCALES}, got {scale!r}")
        return max(32, int(32 / scale))

    def features(self, images: torch.Tensor) -> torch.Tensor | None:
        """The feature head's output for (B, 3, H, W) images, or None for 4.5/4.6. A caller
        that pairs each frame several times computes this once per frame and passes it to
        forward."""
        return None if self.encode is None else self.encode(images.clamp(0.0, 1.0))

    def forward(
        self,
        img0: torch.Tensor,
        img1: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        scale: float = 1.0,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The frame at `timestep` between img0 (t=0) and img1 (t=1).

        img0, img1: (B, 3, H, W) RGB in [0, 1], in the model's dtype, H and W multiples of
        `pad_multiple(scale)`. timestep: a number or one per pair, (B,) or (B, 1, 1, 1).
        scale: resolution of the flow estimate (see FLOW_SCALES). features: `features()` of
        img0 and img1 if already computed (4.7+; ignored otherwise).
        Returns (B, 3, H, W) in [0, 1].
        """
        img0 = img0.clamp(0.0, 1.0)
        img1 = img1.clamp(0.0, 1.0)
        batch, _, height, width = img0.shape
        multiple = self.pad_multiple(scale)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        t = torch.as_tensor(timestep, dtype=img0.dtype, device=img0.device)
        t = t.reshape(-1, 1, 1, 1).expand(batch, 1, height, width)

        if self.encode is not None:
            f0, f1 = features if features is not None else (self.features(img0), self.features(img1))
            extra = (f0, f1)
        else:
            extra = ()
        grid = _base_grid(height, width, img0.device)

        warped0, warped1 = img0, img1
        flow = mask = None
        for level, block in enumerate((self.block0, self.block1, self.block2, self.block3)):
            block_scale = 2 ** (3 - level) / scale
            if flow is None:
                flow, mask = block(torch.cat((img0, img1, *extra, t), 1), None, block_scale)
            else:
                warped_extra = (
                    (_warp(extra[0], flow[:, :2], grid), _warp(extra[1], flow[:, 2:4], grid)) if extra else ()
                )
                flow_update, mask_update = block(
                    torch.cat((warped0, warped1, *warped_extra, t, mask), 1), flow, block_scale
                )
                flow = flow + flow_update
                # 4.7+ predict the mask afresh at each level; 4.5/4.6 refine it.
                mask = mask_update if self.encode is not None else mask + mask_update
            warped0 = _warp(img0, flow[:, :2], grid)
            warped1 = _warp(img1, flow[:, 2:4], grid)
        mask = torch.sigmoid(mask)
        return warped0 * mask + warped1 * (1 - mask)


def _strip_prefixes(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The state dict with the `module.` prefixes that DistributedDataParallel adds (and the
    authors' checkpoints keep) removed."""
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key.removeprefix("module.")
        if name in stripped:
            raise ValueError(f"state dict has {name!r} both with and without the 'module.' prefix")
        stripped[name] = value
    return stripped


def _listed(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, tuple[int, ...]]:
    """The layout name and block widths that the weights were trained with."""
    needed = ["block0.lastconv.0.weight"] + [f"block{i}.conv0.1.0.weight" for i in range(4)]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ValueError(
            f"not a RIFE 4.5-4.9 IFNet state dict: missing {_listed(missing)}"
            f" (it has {_listed(sorted(state_dict))})"
        )
    outputs, remainder = divmod(state_dict["block0.lastconv.0.weight"].shape[1], 4)
    features = any(key.startswith("encode.") for key in state_dict)
    version = next(
        (name for name, layout in LAYOUTS.items() if layout == (features, outputs) and not remainder), None
    )
    if version is None:
        raise ValueError(
            f"not a RIFE 4.5-4.9 IFNet state dict: block0.lastconv.0.weight has shape "
            f"{tuple(state_dict['block0.lastconv.0.weight'].shape)}, which predicts "
            f"{state_dict['block0.lastconv.0.weight'].shape[1] / 4:g} channels "
            f"{'with' if features else 'without'} a feature head (encode.*); 4.5 predicts 5 without, "
            f"4.6 6 without and 4.7-4.9 6 with"
        )
    widths = tuple(int(state_dict[f"block{i}.conv0.1.0.weight"].shape[0]) for i in range(4))
    return version, widths


def load_ifnet(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> IFNet:
    """An IFNet holding the weights in `source`, on the CPU in float32, in eval mode.

    source: a file written by torch.save (the authors' `flownet.pkl`, ComfyUI's
    `rife47.pth`, ...) or a state dict already loaded. `module.` prefixes are stripped; the
    release and the widths come from the tensors' names and shapes.
    Raises ValueError naming the missing, unexpected or misshapen entries when the weights
    are not a RIFE 4.5-4.9 IFNet. Move the result with `.to(device, dtype)`.
    """
    if isinstance(source, Mapping):
        state_dict = source
    else:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{os.fspath(source)} holds a {type(state_dict).__name__}, not a state dict")
    state_dict = _strip_prefixes(state_dict)
    version, widths = _infer_architecture(state_dict)
    with torch.device("meta"):
        model = IFNet(version, widths)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(
        f"{name} is {tuple(state_dict[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    )
    problems = [
        f"{label} {_listed(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape:", misshapen))
        if names
    ]
    if problems:
        raise ValueError(f"not a RIFE {version} IFNet state dict: " + "; ".join(problems))
    model = IFNet(version, widths)
    model.load_state_dict({name: t.float() for name, t in state_dict.items()})
    return model.eval().requires_grad_(False)


def build_random(size: str = "demo", seed: int = 0, *, version: str = "4.6") -> IFNet:
    """An IFNet with random weights, for tests and speed measurements: no download needed.

    size: `demo` (DEMO_WIDTHS, quick on a CPU; its frames are blends with random motion)
    or `full` (the authors' widths, for GPU timings).
    The same seed gives the same weights. CPU, float32, eval mode.
    """
    widths = {"demo": DEMO_WIDTHS, "full": FULL_WIDTHS}.get(size)
    if widths is None:
        raise ValueError(f"size must be 'demo' or 'full', got {size!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = IFNet(version, widths)
    return model.eval().requires_grad_(False)
