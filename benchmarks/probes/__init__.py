"""Probes: narrower measurements than `benchmarks.bench`, each of one thing the product
still does, run as `python -m benchmarks.probes.<name> --out FILE.json`. Each needs a GPU
to measure; without one it runs the same code on the demo model (what the tests check),
which is no measurement."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The clip every probe generates: --frames and --size, defaulting per device."""
    parser.add_argument("--frames", type=int, default=None, help="default: 25 on a GPU, 8 on the CPU")
    parser.add_argument("--size", default=None, metavar="HxW",
                        help="the image; default: 576x1024 on a GPU, 64x64 on the CPU")


@dataclass
class ProbeShape:
    """Where a probe runs and what it generates: the GPU with the full-size synthetic model,
    else the CPU with the demo one."""

    cuda: bool
    device: torch.device
    frames: int
    height: int
    width: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProbeShape:
        cuda = torch.cuda.is_available()
        height, width = map(int, (args.size or ("576x1024" if cuda else "64x64")).split("x"))
        return cls(cuda, torch.device("cuda" if cuda else "cpu"),
                   args.frames or (25 if cuda else 8), height, width)

    def header(self) -> dict:
        """The fields every probe's JSON starts with."""
        return {"gpu": torch.cuda.get_device_name() if self.cuda else "cpu",
                "torch": torch.__version__, "model": "synthetic" if self.cuda else "demo",
                "frames": self.frames, "size": [self.height, self.width]}
