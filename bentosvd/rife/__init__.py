"""Learned frame interpolation with RIFE 4.x: the network (`ifnet`) and raising a clip's
frame rate with it on the frames already on the GPU (`interpolate`)."""

from bentosvd.rife.ifnet import IFNet, build_random, load_ifnet
from bentosvd.rife.interpolate import interpolate_frames, times_for_fps, times_for_multiplier

__all__ = [
    "IFNet",
    "build_random",
    "interpolate_frames",
    "load_ifnet",
    "times_for_fps",
    "times_for_multiplier",
]
