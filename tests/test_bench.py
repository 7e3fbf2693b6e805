"""The benchmark and its probes run on the CPU with the demo model (so CI keeps them
working); their numbers are not checked here, only that every part of the run produced them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.server
@pytest.mark.slow
def test_bench_runs_on_cpu_with_demo_model(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        # 4 frames, 3 steps (the profile's): each generation costs a fraction of the
        # demo's 8 and 8, and every part of the run still runs.
        [sys.executable, "-m", "benchmarks.bench", "--model", "demo", "--repeats", "1",
         "--frames", "4", "--steps", "3",
         "--server", "--server-starts", "cold_cache", "--server-burst", "3", "--profile", "fast",
         "--server-env", "STEP_CACHE=2", "MAX_QUEUE=1",
         "--out", str(out), "--markdown"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    eager = report["pipeline"]["modes"]["eager"]
    assert set(eager["phases"]) == {"image_encode", "unet_steps", "vae_decode", "video_encode"}
    assert eager["equivalent_to_eager"] and report["pipeline"]["flops"]["unet_forward"] > 0
    assert report["pipeline"]["vanilla"]["seconds"] > 0
    server = report["server"]["cold_cache"]
    assert server["ready_s"] > 0
    # Where the start went, from the worker's log (no warm-up: the fast path is off on CPU).
    assert server["startup"]["imported_s"] > 0 and server["startup"]["loaded_s"] > 0
    # --server-env reached the server, and its log is kept beside the JSON.
    assert server["env"] == {"STEP_CACHE": "2", "MAX_QUEUE": "1"}
    assert "step_cache=2" in (tmp_path / "bench-cold_cache.log").read_text(errors="replace")
    # The server says where each request's time went (Server-Timing header).
    assert {"queue_wait", "denoise", "vae_decode", "video_encode"} <= set(server["server_timing"][0])
    # --markdown without a path: the table and the command beside the JSON, as a run the
    # journal cites keeps them in benchmarks/results/.
    markdown = (tmp_path / "bench.md").read_text()
    assert "| (a) vanilla diffusers |" in markdown and "benchmarks.bench" in markdown
    assert json.dumps(report["pipeline"]["settings"]) in markdown
    # One step profiled (on the CPU: the eager demo): its kernels add up to its time.
    profile = eager["profile"]
    assert 0 < profile["kernel_s"] and sum(profile["by_kind_s"].values()) > 0
    assert {"convolution", "matmul", "attention"} <= set(profile["by_kind_s"])
    # Three requests at once against one worker and a queue of one: two answered with a
    # video, the third turned away (429), which the burst counts instead of failing on.
    burst = server["burst"]
    assert (burst["requests"], burst["served"], burst["rejected"]) == (3, 2, 1)
    assert len(burst["latencies_s"]) == 2 and burst["requests_per_minute"] > 0


@pytest.mark.server
def test_a_bench_stopped_mid_run_stops_the_server_it_started(tmp_path):
    """Killed by `timeout` (SIGTERM) while its server is up, the benchmark stops that
    server too: a server left behind would answer the next run's requests in place of the
    one being timed (it did on the GPU machine, 2026-11-27)."""
    import time

    import psutil

    bench = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench", "--model", "demo", "--server-only",
         "--server-starts", "cold_cache", "--ready-timeout", "300", "--out", str(tmp_path / "b.json")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    servers = []
    while not servers and time.monotonic() < deadline and bench.poll() is None:
        time.sleep(0.5)
        servers = [p for p in psutil.Process(bench.pid).children(recursive=True)
                   if "serve" in p.cmdline()]
    assert servers, "the benchmark never started a server"
    family = servers + servers[0].children(recursive=True)
    bench.terminate()
    assert bench.wait(120) == 128 + 15
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, [p.cmdline() for p in alive]


def test_the_table_says_where_each_server_start_went():
    from benchmarks.bench import table

    start = {"ready_s": 34.66, "latency_s": 12.5605,
             "startup": {"imported_s": 14.3, "loaded_s": 1.8,
                         "warmed_s": {"landscape": 10.2, "portrait": 5.1}}}
    assert table({"server": {"warm_cache": start}}) == (
        "server, warm_cache: ready 34.7 s (imports 14.3 s, load 1.8 s, warm-up landscape "
        "10.2 s, warm-up portrait 5.1 s), latency 12.56 s")
    # A start whose log said nothing (cut short) still gets its line.
    assert table({"server": {"cold_cache": {"ready_s": 5.0, "latency_s": 1.0}}}) == (
        "server, cold_cache: ready 5.0 s, latency 1.00 s")


def test_the_table_gives_no_rate_where_steps_run_part_of_the_unet():
    """A step-caching mode's cached steps run part of the UNet: its FLOPs over their time
    is no rate (it read 890 TFLOP/s on an H200), so the table leaves that cell empty."""
    from benchmarks.bench import table

    phases = {"image_encode": 0.09, "unet_steps": 10.26, "vae_decode": 0.70, "video_encode": 0.06}
    mode = {"seconds": 11.11, "speedup_vs_vanilla": 1.68, "phases": phases, "peak_gib": 9.8,
            "unet_tflops": 389.5, "psnr_vs_eager_db": 63.9}
    rows = table({"pipeline": {"vanilla": {"seconds": 18.67, "peak_gib": 12.0}, "modes": {
        "fast": mode, "step_cache3": {**mode, "unet_tflops": None}}}}).splitlines()
    assert rows[3] == "| (b) fast | 11.11 | 1.68× | 0.09 | 10.26 | 0.70 | 0.06 | 9.8 | 389.5 | 63.9 |"
    assert rows[4] == "| (b) step_cache3 | 11.11 | 1.68× | 0.09 | 10.26 | 0.70 | 0.06 | 9.8 | – | 63.9 |"


@pytest.mark.slow
def test_the_fallback_probe_runs_every_variant_eagerly(tmp_path):
    """benchmarks/probes/fallback.py on the CPU: the fast path told that no shape may compile
    any more builds no compiled block and makes eager's video (within rounding)."""
    out = tmp_path / "fallback.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes.fallback", "--out", str(out), "--steps", "2",
         "--repeats", "1", "--frames", "2", "--size", "64x64", "--variants", "eager", "fast"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["eager", "fast"] and report["model"] == "demo"
    fast = report["variants"]["fast"]
    assert fast["step_s"] > 0 and fast["vae_decode_s"] > 0 and fast["seconds"] > 0
    assert fast["saved_region_counts"] == {}  # nothing compiled, nothing saved
    assert fast["min_psnr_db_vs_first"] >= 40


@pytest.mark.slow
def test_the_gaps_probe_runs_on_the_cpu(tmp_path):
    """benchmarks/probes/gaps.py end to end on the CPU: a profiled step and the trace beside
    the JSON; with no GPU kernels there are no gaps to count."""
    out = tmp_path / "gaps.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes.gaps", "--out", str(out), "--steps", "3",
         "--frames", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["profiled_step_s"] > 0 and report["kernels"] == 0
    assert report["generate_3_steps_without_s"] > 0
    assert (tmp_path / "gaps.trace.json.gz").stat().st_size > 0


def test_gaps_are_summed_by_place_and_by_the_op_that_launched_the_next_kernel():
    from benchmarks.probes.gaps import gaps

    def kernel(ts, dur, correlation):
        return {"cat": "kernel", "ph": "X", "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    def launch(ts, correlation):
        return {"cat": "cuda_runtime", "ph": "X", "ts": ts, "dur": 1, "args": {"correlation": correlation}}

    def op(name, ts, dur):
        return {"cat": "cpu_op", "ph": "X", "name": name, "ts": ts, "dur": dur, "args": {}}

    # Three kernels over 20 ms: 1 us between the first two (not a gap), then 6 ms idle
    # before the third, launched inside aten::add inside a compiled graph's call.
    trace = {"traceEvents": [
        op("## Call CompiledFxGraph x ##", 0, 20_000), op("aten::add", 13_000, 100),
        launch(10, 1), launch(20, 2), launch(13_050, 3),
        kernel(100, 3_000, 1), kernel(3_101, 10_000, 2), kernel(19_101, 1_000, 3)]}
    result = gaps(trace)
    assert result["kernels"] == 3 and result["kernel_ms"] == 14.0
    assert result["span_ms"] == 20.001
    assert result["gap_ms"] == 6.0 and result["gap_by_place_ms"] == {"last 5 ms": 6.0}
    assert result["gap_by_launcher"] == [{"launcher": "aten::add", "ms": 6.0, "gaps": 1}]
    assert gaps({"traceEvents": [op("aten::add", 0, 5)]}) == {"kernels": 0}


def test_the_probes_refuse_too_few_steps_to_time_one():
    from benchmarks.probes import fallback, gaps

    for probe, steps in ((fallback, "1"), (gaps, "2")):
        with pytest.raises(SystemExit) as stopped:
            probe.parse_args(["--steps", steps])
        assert stopped.value.code == 2
    assert gaps.parse_args([]).steps == 4 and fallback.parse_args([]).variants == [
        "eager", "fast", "fast_nchw_blocks"]


def test_the_turbo_variant_is_benchmarked_at_its_authors_defaults():
    """--variant svd_xt_turbo: on the CPU the demo turbo, on a GPU the synthetic one; either
    way 4 steps without guidance at motion 80, and the server sent exactly that generation."""
    import torch

    from benchmarks.bench import generation, parse_args, served_variant, server_params
    from bentosvd.api.planning import plan_generation
    from bentosvd.config import VARIANTS, Params

    cpu = parse_args(["--variant", "svd_xt_turbo"], torch.device("cpu"))
    gpu = parse_args(["--variant", "svd_xt_turbo", "--decoding-t", "1"], torch.device("cuda"))
    assert (cpu.model, served_variant(cpu), cpu.frames) == ("demo", "demo_turbo", VARIANTS["demo"].num_frames)
    assert (gpu.model, served_variant(gpu), gpu.frames, gpu.height) == ("synthetic", "svd_xt_turbo", 25, 576)
    for args in (cpu, gpu):
        job = generation(args)
        assert (job.num_inference_steps, job.min_guidance_scale, job.max_guidance_scale,
                job.motion_bucket_id) == (4, 1.0, 1.0, 80)
        planned, _ = plan_generation(Params(**server_params(args)), VARIANTS[served_variant(args)], "mp4")
        assert planned == job
    # SVD-XT's runs keep the benchmark's own generation.
    svd_xt = generation(parse_args([], torch.device("cuda")))
    assert (svd_xt.num_inference_steps, svd_xt.max_guidance_scale, svd_xt.motion_bucket_id) == (25, 3.0, 127)
