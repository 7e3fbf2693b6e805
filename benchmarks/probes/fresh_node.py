"""A fresh node: how soon does `bentoml serve` answer, how fast is it while it compiles, and
when does compiled speed arrive, without a restart? Then RIFE against minterpolate.

    python -m benchmarks.probes.fresh_node --out $OUT/fresh.json    # on the GPU machine,
                                                                    # after scripts/device_bench.sh

Registers the full-size synthetic SVD-XT (with a full-size random RIFE) in a model store
of its own and serves it with an empty COMPILE_CACHE_DIR (COMPILE_IN_BACKGROUND, the
default), WARMUP as --warmup. From `bentoml serve`'s start it times: /readyz 200, the first
video, every request sent back to back while the blocks compile (each with what /info
said of the shapes), when /info says every shape is compiled, and the compiled latency.
What compiling costs the requests meanwhile: their latency against an uncompiled request
after the compile (a shape not in WARMUP). Then, on the compiled server: the same request
with interpolate_fps 2x and 4x by RIFE and by minterpolate, and RIFE alone on the GPU (ms
per added frame at the model's size, fp16). Then a restart on the same cache: ready, and
the first request. Without a GPU it runs the demo model on the CPU: a check of the probe.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import ROOT, command, free_port, post_image, wait_ready


def info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/info", timeout=30) as r:
        return json.loads(r.read())


def shapes(url: str) -> dict:
    return info(url)["workers"][0].get("shapes") or {}


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def rife_alone(width: int, height: int, frames: int, repeats: int = 5) -> dict:
    """RIFE on the GPU by itself: ms per added frame, x2 and x4, fp16, full-size weights."""
    from bentosvd.rife.ifnet import build_random
    from bentosvd.rife.interpolate import interpolate_frames, times_for_multiplier

    if not torch.cuda.is_available():
        return {}
    model = build_random("full").to("cuda", torch.float16)
    clip = torch.randint(0, 256, (frames, height, width, 3), dtype=torch.uint8, device="cuda")
    result = {}
    for k in (2, 4):
        times = times_for_multiplier(frames, k)
        runs = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            interpolate_frames(model, clip, times=times)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        added = len(times) - frames
        result[f"x{k}"] = {"added_frames": added, "seconds": statistics.median(runs[1:]),
                           "ms_per_added_frame": 1000 * statistics.median(runs[1:]) / added}
    return result


def peak(log_path: Path) -> int | None:
    """The highest gpu_peak_bytes of the server's `generated` log lines."""
    found = re.findall(r'"gpu_peak_bytes": (\d+)', log_path.read_text(errors="replace"))
    return max(map(int, found)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", nargs="+", default=["landscape"])
    parser.add_argument("--limit", type=float, default=500, help="seconds to wait for the compile")
    parser.add_argument("--variant", default="svd_xt", help="svd_xt, or svd_xt_turbo at its own defaults")
    parser.add_argument("--skip", nargs="*", default=[], choices=["restart", "interpolation", "rife", "during"],
                        help="leave out: the restart, interpolation, RIFE alone, requests while compiling")
    parser.add_argument("--cache", type=Path, default=None,
                        help="COMPILE_CACHE_DIR to serve with (default: an empty one); a later "
                        "run given the same folder starts on what this one compiled")
    parser.add_argument("--out", type=Path, default=Path("fresh.json"))
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    from bentosvd.config import VARIANTS

    variant = args.variant if on_gpu else next(
        v.name for v in VARIANTS.values() if v.demo and v.sampler == VARIANTS[args.variant].sampler)
    work = Path(tempfile.mkdtemp(prefix="bentosvd-fresh-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "home"), "BENTOML_DO_NOT_TRACK": "true",
           "COMPILE_CACHE_DIR": str(args.cache or work / "cache"), "MODEL_VERSION": variant,
           "WARMUP": json.dumps(args.warmup), "JOBS_DIR": str(work / "jobs"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not on_gpu:
        env["FAST_PATH"] = "true"
    cmd = [sys.executable, "import_model.py", "--variant", variant] + (["--synthetic"] if on_gpu else [])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    if on_gpu:
        env["MODEL_TAG"] = done.stdout.split("MODEL_TAG=")[1].split()[0]
    v = VARIANTS[variant]
    landscape, portrait = png(v.width, v.height), png(v.height, v.width)
    # SVD-XT as docs/performance.md measures it; the turbo at its own defaults.
    params = {"seed": 1, "num_inference_steps": 25, "min_guidance_scale": 1.0,
              "max_guidance_scale": 3.0, "decoding_t": 1} if on_gpu and v.sampler == "euler" else {"seed": 1}
    result = {"command": command("benchmarks.probes.fresh_node", None), "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
              "variant": variant, "warmup": args.warmup, "params": params,
              "cache": "given" if args.cache and args.cache.is_dir() and any(args.cache.iterdir()) else "empty"}

    def save():
        args.out.write_text(json.dumps(result, indent=1, default=str))

    for start_kind in ("fresh", "restart")[:1 if "restart" in args.skip else 2]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = work / f"{start_kind}.log"
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:svc", "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = wait_ready(url, proc, 900)
            r = result[start_kind] = {"ready_s": ready, "shapes_at_ready": shapes(url)}
            seconds, status, _, _ = post_image(url, landscape, params)
            assert status == 200, status
            r["first_video_s"] = time.perf_counter() - started  # from `bentoml serve`
            r["first_request_s"] = seconds
            save()  # a run cut short keeps what it has
            if start_kind == "fresh":
                during = []
                while set(shapes(url).values()) != {"compiled"}:
                    if time.perf_counter() - started > args.limit:
                        break
                    if "during" in args.skip:
                        r["compiled_at_s"] = None
                        save()
                        time.sleep(1)
                        continue
                    seconds, status, _, _ = post_image(url, landscape, params)
                    during.append({"at_s": time.perf_counter() - started, "seconds": seconds,
                                   "status": status})
                    save()
                r["while_compiling"] = during
                r["compiled_at_s"] = time.perf_counter() - started if set(shapes(url).values()) == {"compiled"} else None
            compiled = [post_image(url, landscape, params)[0] for _ in range(3)]
            r["latency_s"] = statistics.median(compiled[1:])
            r["first_compiled_request_s"] = compiled[0]
            if start_kind == "fresh":
                r["uncompiled_shape_s"] = post_image(url, portrait, params)[0]  # not in WARMUP
                eager_during = [d["seconds"] for d in r["while_compiling"]]
                if eager_during:
                    r["compile_costs_requests"] = statistics.median(eager_during) / r["uncompiled_shape_s"]
                plain = r["latency_s"]
                smooth = {}
                for method in () if "interpolation" in args.skip else ("rife", "minterpolate"):
                    for target in (14, 28):
                        s, status, headers, data = post_image(
                            url, landscape, {**params, "fps_id": 6, "interpolate_fps": target,
                                             "interpolation": method})
                        smooth[f"{method}_{target}"] = {"seconds": s, "status": status,
                                                        "added_s": s - plain,
                                                        "header": headers.get("X-Interpolation")}
                r["interpolation_end_to_end"] = smooth
            if start_kind == "fresh" and on_gpu:
                r["gpu_peak_bytes"] = peak(log_path)
            save()
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            shutil.copy(log_path, args.out.with_name(f"{args.out.stem}-{start_kind}.log"))
        print(start_kind, json.dumps({k: v for k, v in result[start_kind].items() if k != "while_compiling"},
                                     default=str), flush=True)
    if "rife" not in args.skip:
        result["rife_alone"] = rife_alone(v.width, v.height, v.num_frames)
    print("rife alone", result.get("rife_alone"), flush=True)
    save()


if __name__ == "__main__":
    main()
