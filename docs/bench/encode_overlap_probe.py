"""What encoding the video while it is decoded saves a request, on one machine in one
process (run on the device machine after `source scripts/device_bench.sh`):

    python3 docs/bench/encode_overlap_probe.py $OUT/encode_overlap.json

The server now hands each decoded chunk to a `StreamingEncode` thread
(`VideoGenerator.decode(..., on_frames)`); before, it decoded the whole clip in one
`decode_latents` call and then encoded it. On the full-size synthetic VAE (fp16, decoder
compiled as the fast path compiles it, 25 frames of 576x1024, `decoding_t` 1) and random
latents, the time from the latents to the MP4's bytes, three ways, interleaved:
- before: one `decode_latents` call for the clip, then `encode_mp4` of the whole clip;
- chunked: `VideoGenerator.decode` (one call per chunk, each chunk's copy to the host
  waited for once the next call is queued), then `encode_mp4` (what the per-chunk
  decoding alone costs);
- streamed: `VideoGenerator.decode` feeding a `StreamingEncode`, then its `result()`
  (what the server does now).
Each is split into the decode (until the last frame is on the host) and what is left of
the encode after it. Medians of REPEATS (default 7). Without a GPU: the demo model.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from bentosvd.weights.random_weights import build_demo, build_synthetic
from bentosvd.media.streaming_encode import StreamingEncode
from bentosvd.svd.generator import HostCopy, VideoGenerator, sync
from bentosvd.svd.speedups import Speedups
from bentosvd.media.video import encode_mp4

OUT = sys.argv[1] if len(sys.argv) > 1 else "encode_overlap.json"
REPEATS = int(os.environ.get("REPEATS", 7))
FPS = 7


def before(gen, latents):
    decoded = gen.pipe.decode_latents(latents, latents.shape[1], 1)
    frames = HostCopy(gen.pipe.video_processor.postprocess_video(decoded, output_type="pt")[0]).wait()
    decoded_at = time.perf_counter()
    return decoded_at, encode_mp4(frames, FPS)


def chunked(gen, latents):
    frames = gen.decode(latents, 1)
    decoded_at = time.perf_counter()
    return decoded_at, encode_mp4(frames, FPS)


def streamed(gen, latents):
    shape = (latents.shape[1], *(s * gen.pipe.vae_scale_factor for s in latents.shape[-2:]), 3)
    encoder = StreamingEncode(shape, {"format": "mp4", "fps": FPS}, crf=17, preset="veryfast")
    gen.decode(latents, 1, encoder.add)
    decoded_at = time.perf_counter()
    return decoded_at, encoder.result()


@torch.no_grad()
def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    frames, h, w = (25, 72, 128) if cuda else (8, 18, 32)
    parts = build_synthetic(frames, device) if cuda else build_demo(frames)
    # The fast path's decoder, compiled in this process rather than loaded from a file.
    speedups = replace(Speedups(), compile_vae=True) if cuda else Speedups()
    gen = VideoGenerator(parts, device, speedups)
    del gen.pipe.unet, gen.pipe.image_encoder  # only the decoder runs here
    latents = torch.randn(1, frames, 4, h, w, device=device, dtype=gen.pipe.vae.dtype,
                          generator=torch.Generator(device).manual_seed(0))
    results = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "frames": frames, "size": [h * 8, w * 8], "repeats": REPEATS}
    started = time.perf_counter()
    reference = chunked(gen, latents)[1]  # compiles the decoder for one frame
    results["first_call_s"] = time.perf_counter() - started
    ways = {"before": before, "chunked": chunked, "streamed": streamed}
    times = {name: {"decode": [], "encode_after": [], "total": []} for name in ways}
    for _ in range(REPEATS):
        for name, way in ways.items():
            sync(device)
            t0 = time.perf_counter()
            decoded_at, mp4 = way(gen, latents)
            done = time.perf_counter()
            assert mp4 == reference, f"{name} made other bytes"
            times[name]["decode"].append(decoded_at - t0)
            times[name]["encode_after"].append(done - decoded_at)
            times[name]["total"].append(done - t0)
    results["mp4_bytes"] = len(reference)
    results["median_s"] = {name: {k: statistics.median(v) for k, v in t.items()}
                           for name, t in times.items()}
    results["all_s"] = times
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)
    for name, t in results["median_s"].items():
        print(f"{name:9s} decode {t['decode']:.3f} s, encode after it {t['encode_after']:.3f} s, "
              f"total {t['total']:.3f} s")


if __name__ == "__main__":
    main()
