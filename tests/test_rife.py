"""RIFE frame interpolation (bentosvd.rife): the network against a reference transcription
of the authors' code, the output timeline, and loading weights from a file.

The reference is vsrife (MIT, VapourSynth's RIFE plugin), which keeps one file per RIFE
release. Its package __init__ needs VapourSynth, which has no Linux wheel, so the test
installs it without dependencies (`pip install --no-deps vsrife==5.7.0`) and loads only
the architecture files, which need nothing but torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from bentosvd.rife import (
    IFNet,
    build_random,
    interpolate_frames,
    load_ifnet,
    times_for_fps,
    times_for_multiplier,
)
from bentosvd.rife.ifnet import DEMO_WIDTHS, FULL_WIDTHS

REFERENCE_FILES = {"4.5": "IFNet_HDv3_v4_5", "4.6": "IFNet_HDv3_v4_6", "4.7": "IFNet_HDv3_v4_7",
                   "4.9": "IFNet_HDv3_v4_9"}


def reference_module(release: str) -> types.ModuleType:
    """vsrife's architecture file for a release, imported without vsrife's __init__."""
    spec = importlib.util.find_spec("vsrife")  # finds the package without importing it
    if spec is None:
        pytest.fail("the reference implementation is missing: pip install --no-deps vsrife==5.7.0")
    if "_vsrife_reference" not in sys.modules:
        package = types.ModuleType("_vsrife_reference")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["_vsrife_reference"] = package
    return importlib.import_module(f"_vsrife_reference.{REFERENCE_FILES[release]}")


def reference_forward(release, state_dict, img0, img1, timestep, scale, widths=FULL_WIDTHS):
    """vsrife's forward with `state_dict` loaded, called as vsrife calls it."""
    module = reference_module(release)
    net = module.IFNet(scale=scale)
    for i, width in enumerate(widths):  # vsrife hard-codes the authors' widths
        block = getattr(net, f"block{i}")
        setattr(net, f"block{i}", module.IFBlock(block.conv0[0][0].in_channels, c=width))
    net.load_state_dict(state_dict)
    net.eval()
    batch, _, height, width = img0.shape
    flow_div = torch.tensor([(width - 1.0) / 2.0, (height - 1.0) / 2.0])
    xs = torch.linspace(-1.0, 1.0, width).view(1, 1, 1, width).expand(-1, -1, height, -1)
    ys = torch.linspace(-1.0, 1.0, height).view(1, 1, height, 1).expand(-1, -1, -1, width)
    grid = torch.cat([xs, ys], 1)
    t = timestep.view(-1, 1, 1, 1).expand(batch, 1, height, width)
    with torch.inference_mode():
        if "encode.0.weight" in state_dict:
            return net(img0, img1, t, flow_div, grid, net.encode(img0), net.encode(img1))
        return net(img0, img1, t, flow_div, grid)


def lively_weights(model: IFNet, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights with larger flow outputs and uneven residual gains, so that the
    comparison exercises warping rather than a plain blend of the two frames."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in model.state_dict().items():
        if "lastconv.0." in name:
            tensor = tensor * 10
        elif name.endswith(".beta"):
            tensor = tensor + 0.2 * torch.randn(tensor.shape, generator=generator)
        weights[name] = tensor
    return weights


def random_images(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, height, width, generator=generator),
            torch.rand(batch, 3, height, width, generator=generator))


@pytest.mark.parametrize(
    "release, scale",
    [("4.6", 1.0), ("4.6", 0.5), ("4.5", 1.0), ("4.7", 1.0), ("4.9", 0.5)],
)
def test_full_network_matches_the_reference(release, scale):
    layout = "4.7" if release == "4.9" else release
    weights = lively_weights(build_random("full", seed=1, version=layout), seed=2)
    model = load_ifnet(weights)
    assert model.version == layout and model.widths == FULL_WIDTHS
    img0, img1 = random_images(2, 64, 128)
    timestep = torch.tensor([0.3, 0.75])

    with torch.inference_mode():
        ours = model(img0, img1, timestep, scale=scale)
    theirs = reference_forward(release, weights, img0, img1, timestep, scale)

    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    blend = img0 * (1 - timestep.view(-1, 1, 1, 1)) + img1 * timestep.view(-1, 1, 1, 1)
    assert (ours - blend).abs().mean() > 0.05  # the flows moved pixels


@pytest.mark.parametrize("version", ["4.6", "4.7"])
def test_demo_network_matches_the_reference_at_its_widths(version):
    weights = lively_weights(build_random("demo", seed=3, version=version), seed=4)
    model = load_ifnet(weights)
    assert model.widths == DEMO_WIDTHS
    img0, img1 = random_images(1, 32, 96, seed=5)
    timestep = torch.tensor([0.5])
    with torch.inference_mode():
        ours = model(img0, img1, timestep)
    theirs = reference_forward(version, weights, img0, img1, timestep, 1.0, widths=DEMO_WIDTHS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_precomputed_features_give_the_same_frame():
    model = load_ifnet(lively_weights(build_random("demo", seed=6, version="4.7"), seed=7))
    img0, img1 = random_images(2, 32, 32, seed=8)
    with torch.inference_mode():
        direct = model(img0, img1, 0.4)
        cached = model(img0, img1, 0.4, features=(model.features(img0), model.features(img1)))
    torch.testing.assert_close(direct, cached, atol=0, rtol=0)
    assert build_random("demo", version="4.6").features(img0) is None


def test_build_random_is_seeded():
    same = [build_random("demo", seed=9).state_dict() for _ in range(2)]
    other = build_random("demo", seed=10).state_dict()
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    assert not torch.equal(same[0]["block0.conv0.0.0.weight"], other["block0.conv0.0.0.weight"])
    with pytest.raises(ValueError, match="size must be"):
        build_random("huge")


# The timeline.


def test_multiplier_timelines():
    assert times_for_multiplier(3, 2) == [0, Fraction(1, 2), 1, Fraction(3, 2), 2]
    assert len(times_for_multiplier(25, 2)) == 49
    quadruple = times_for_multiplier(25, 4)
    assert len(quadruple) == 97 and quadruple[-1] == 24
    assert quadruple[:5] == [0, Fraction(1, 4), Fraction(1, 2), Fraction(3, 4), 1]
    assert times_for_multiplier(4, 1) == [0, 1, 2, 3]
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="multiplier"):
            times_for_multiplier(25, bad)


def test_fps_timeline_has_exact_timestamps():
    times = times_for_fps(25, 7, 10)
    # Frame j is shown at j/10 s; the last one at or before the last source frame (24/7 s).
    assert len(times) == 24 * 10 // 7 + 1 == 35
    assert all(t / 7 == Fraction(j, 10) for j, t in enumerate(times))
    assert times[-1] <= 24 < times[-1] + Fraction(7, 10)
    # Source frames land where j/10 s is a multiple of 1/7 s: j = 0, 10, 20, 30.
    assert [j for j, t in enumerate(times) if t.denominator == 1] == [0, 10, 20, 30]
    assert [times[j] for j in (0, 10, 20, 30)] == [0, 7, 14, 21]


def test_fps_timeline_agrees_with_the_multiplier():
    assert times_for_fps(25, 7, 14) == times_for_multiplier(25, 2)
    assert times_for_fps(25, 7, 28) == times_for_multiplier(25, 4)
    ntsc = Fraction(30000, 1001)
    assert times_for_fps(10, ntsc, 2 * ntsc) == times_for_multiplier(10, 2)
    assert times_for_fps(1, 7, 10) == [0]
    for fps, target in ((7.0, 10), (7, 0), (0, 10), (7, -1)):
        with pytest.raises(ValueError, match="fps"):
            times_for_fps(25, fps, target)
    with pytest.raises(ValueError, match="num_frames"):
        times_for_fps(0, 7, 10)


# Interpolating frames.


@pytest.fixture(scope="module")
def demo_model() -> IFNet:
    return load_ifnet(lively_weights(build_random("demo", seed=11), seed=12))


def random_frames(count, height, width, seed=13):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator)


def one_frame(model, frames, before, t):
    """The frame at `before + t`, made by calling the model directly on padded frames."""
    height, width = frames.shape[1:3]
    multiple = model.pad_multiple()
    pad = (0, -width % multiple, 0, -height % multiple)
    pair = F.pad(frames[[before, before + 1]].permute(0, 3, 1, 2).float() / 255, pad)
    with torch.inference_mode():
        made = model(pair[:1], pair[1:], float(t))[0, :, :height, :width]
    return (made.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


@pytest.mark.parametrize(
    "count, timeline, source_positions",
    [
        (4, times_for_multiplier(4, 2), [0, 2, 4, 6]),
        (4, times_for_multiplier(4, 4), [0, 4, 8, 12]),
        (8, times_for_fps(8, 7, 10), [0, 10]),
    ],
    ids=["x2", "x4", "7-to-10fps"],
)
def test_sources_kept_and_new_frames_made(demo_model, count, timeline, source_positions):
    frames = random_frames(count, 40, 50)  # neither side a multiple of 32
    out = interpolate_frames(demo_model, frames, times=timeline, batch_size=3)

    assert out.dtype == torch.uint8 and out.shape == (len(timeline), 40, 50, 3)
    assert [j for j, t in enumerate(timeline) if t.denominator == 1] == source_positions
    for j in source_positions:
        assert torch.equal(out[j], frames[int(timeline[j])])
    for j, t in enumerate(timeline):
        if t.denominator != 1:
            before = int(t)
            expected = one_frame(demo_model, frames, before, t - before)
            torch.testing.assert_close(out[j].int(), expected.int(), atol=1, rtol=0)
            assert not torch.equal(out[j], frames[before]) and not torch.equal(out[j], frames[before + 1])


def test_batch_size_and_order_do_not_change_frames(demo_model):
    frames = random_frames(3, 33, 70, seed=14)
    timeline = times_for_multiplier(3, 4)
    one_by_one = interpolate_frames(demo_model, frames, times=timeline, batch_size=1)
    all_at_once = interpolate_frames(demo_model, frames, times=timeline, batch_size=64)
    torch.testing.assert_close(one_by_one.int(), all_at_once.int(), atol=1, rtol=0)
    backwards = interpolate_frames(demo_model, frames, times=timeline[::-1])
    torch.testing.assert_close(backwards.flip(0).int(), all_at_once.int(), atol=1, rtol=0)


def test_feature_head_release_interpolates():
    model = load_ifnet(lively_weights(build_random("demo", seed=15, version="4.7"), seed=16))
    frames = random_frames(3, 24, 40, seed=17)
    out = interpolate_frames(model, frames, times=[Fraction(1, 3), 1, Fraction(7, 4)])
    assert torch.equal(out[1], frames[1])
    for j, before, t in ((0, 0, Fraction(1, 3)), (2, 1, Fraction(3, 4))):
        expected = one_frame(model, frames, before, t)
        torch.testing.assert_close(out[j].int(), expected.int(), atol=1, rtol=0)


def test_half_precision_model(demo_model):
    frames = random_frames(2, 32, 32, seed=18)
    half = load_ifnet(demo_model.state_dict()).half()
    out = interpolate_frames(half, frames, times=[0, 0.5, 1])
    assert out.dtype == torch.uint8 and torch.equal(out[0], frames[0]) and torch.equal(out[2], frames[1])
    full = interpolate_frames(demo_model, frames, times=[0.5])
    assert (out[1].int() - full[0].int()).abs().float().mean() < 2


def test_only_source_times_skip_the_model(demo_model):
    frames = random_frames(1, 20, 20, seed=19)
    out = interpolate_frames(demo_model, frames, times=times_for_fps(1, 7, 14))
    assert torch.equal(out, frames)


@pytest.mark.parametrize(
    "frames, times, message",
    [
        (torch.zeros(2, 8, 8, 3), [0.5], "uint8"),
        (torch.zeros(2, 8, 8, dtype=torch.uint8), [0.5], r"\(N, H, W, 3\)"),
        (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), [], r"\(N, H, W, 3\)"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [1.5], "outside the clip"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [-0.5], "outside the clip"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [float("nan")], "times must be numbers"),
    ],
)
def test_bad_input_is_refused(demo_model, frames, times, message):
    with pytest.raises(ValueError, match=message):
        interpolate_frames(demo_model, frames, times=times)


def test_bad_batch_size_and_scale_are_refused(demo_model):
    frames = random_frames(2, 8, 8)
    with pytest.raises(ValueError, match="batch_size"):
        interpolate_frames(demo_model, frames, times=[0.5], batch_size=0)
    with pytest.raises(ValueError, match="scale"):
        interpolate_frames(demo_model, frames, times=[0.5], scale=0.3)


# Loading weights.


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["authors-flownet.pkl", "unprefixed"])
@pytest.mark.parametrize("version", ["4.6", "4.7"])
def test_loads_a_saved_state_dict(tmp_path, demo_model, prefix, version):
    source = build_random("demo", seed=20, version=version)
    path = tmp_path / "flownet.pkl"
    torch.save({prefix + name: tensor for name, tensor in source.state_dict().items()}, path)

    loaded = load_ifnet(path)

    assert loaded.version == version and loaded.widths == DEMO_WIDTHS and not loaded.training
    img0, img1 = random_images(1, 32, 32, seed=21)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(img0, img1, 0.5), source(img0, img1, 0.5), atol=0, rtol=0)


def saved_weights(tmp_path, change) -> str:
    weights = {"module." + k: v for k, v in build_random("demo", seed=22).state_dict().items()}
    change(weights)
    path = tmp_path / "flownet.pkl"
    torch.save(weights, path)
    return str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("module.block2.convblock.3.beta"), "missing block2.convblock.3.beta"),
        (lambda w: w.update({"module.contextnet.conv1.0.weight": torch.zeros(1)}),
         "unexpected contextnet.conv1.0.weight"),
        (lambda w: w.update({"module.block1.conv0.0.0.weight": torch.zeros(8, 5, 3, 3)}),
         r"wrong shape: block1.conv0.0.0.weight is \(8, 5, 3, 3\), expected \(8, 12, 3, 3\)"),
        (lambda w: w.update({"module.encode.0.weight": torch.zeros(16, 3, 3, 3)}),
         "RIFE 4.7 IFNet state dict: missing encode.0.bias"),
        (lambda w: w.pop("module.block0.lastconv.0.weight"), "missing block0.lastconv.0.weight"),
        (lambda w: w.update({"module.block0.lastconv.0.weight": torch.zeros(16, 28, 4, 4)}),
         "predicts 7 channels"),
        (lambda w: w.update({"block3.convblock.0.beta": torch.ones(1, 8, 1, 1)}),
         "both with and without the 'module.' prefix"),
    ],
    ids=["missing", "unexpected", "wrong-shape", "half-a-head", "no-lastconv", "later-release", "twice"],
)
def test_wrong_weights_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_ifnet(saved_weights(tmp_path, change))


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "flownet.pkl"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_ifnet(path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_ifnet({"block0.conv0.0.0.weight": "text"})
