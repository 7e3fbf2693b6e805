#!/usr/bin/env bash
# Fill .whl/ with every wheel that the GPU ("device") machine lacks to run the service:
# `import bentoml, diffusers, av, pydantic_settings` and `bentoml serve service:svc`.
#
# That machine has no network. Its python3 is CPython 3.12.3 (x86_64, glibc 2.39) and already
# holds torch 2.11.0+cu130, transformers 5.17.0, huggingface_hub 1.33.0, numpy, pillow, aiohttp,
# ... (MACHINE below: its `pip list` as read there). This script downloads, for that
# interpreter, only what is missing there or must be newer, each version pinned:
#
#   bash scripts/device_wheels.sh          # download into .whl/ (replaces its *.whl), then check
#   HUB2=1 bash scripts/device_wheels.sh   # also carry huggingface-hub 2.4.0 (see below)
#   bash scripts/device_wheels.sh --check  # only re-run the check on what .whl/ holds
#
# On the device machine (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Size. av's wheel alone is 34 MiB (it bundles FFmpeg; every av release since 12 is 33-39 MiB),
# so .whl/ would be ~46 MiB. To stay under 44 MiB the compiled wheels (REPACK) are re-zipped
# with LZMA instead of deflate: same files, same RECORD (its hashes are of the uncompressed
# files), and pip extracts them through Python's zipfile, which reads LZMA (av: 34.1 -> 25.5 MiB).
# REPACK= (empty) keeps the wheels byte for byte as PyPI serves them.
#
# huggingface-hub / transformers. diffusers 0.42.1 asks huggingface-hub>=1.32.0,<3.0 and no
# transformers at all, so the machine's hub 1.33.0 and transformers 5.17.0 serve it and are not
# carried by default. requirements.txt pins hub 2.4.0 (bentosvd/weights/hub.py, used only by
# import_model.py downloads, and tests/fake_hub.py target 2.x), but carrying hub 2.x forces
# transformers 5.23.0 too: transformers 5.17.0 asks huggingface-hub<2.0 and checks it when imported
# (dependency_versions_check), so 5.17 + hub 2.x fails on `import transformers`; and tokenizers
# 0.23.3 (the machine's 0.23.2 declares hub<2.0). HUB2=1 adds those: ~+17 MiB, over the 40 MiB
# budget (~53 MiB repacked; ~64 MiB unrepacked, over the 64 MiB transfer limit).
#
# Never carried: torch, triton, nvidia-* (nvidia-ml-py, which bentoml needs, is on the machine).
# Machine packages left as they are although requirements.txt pins others: numpy 2.5.2 (pin
# 2.4.6), pillow 12.3.0 (pin 13.0.0); accelerate 1.15.0 and safetensors 0.8.0 equal the pins.
set -euo pipefail
cd "$(dirname "$0")/.."

WHL_DIR=.whl
MAX_MIB=44

# Every wheel carried, exactly one version each (the dependency closure of the pins below
# for CPython 3.12 manylinux x86_64, minus what MACHINE already satisfies).
WHEELS=(
  # the project's pins
  bentoml==1.4.39
  diffusers==0.42.1
  av==18.1.0                 # cp311-abi3 manylinux_2_28 wheel, bundles FFmpeg
  torchao==0.18.0            # FP8 (opt-in); abi3 wheel
  pydantic==2.14.3
  pydantic-settings==2.16.3
  # pydantic / pydantic-settings
  pydantic-core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  python-dotenv==1.2.4
  # diffusers
  importlib-metadata==10.2.0
  lazy-importer==0.1.0
  # bentoml
  a2wsgi==1.10.10
  aiohttp-asgi-connector==1.2.0
  aiosqlite==0.22.1
  asgiref==3.13.0
  cattrs==23.1.2
  click-option-group==0.5.9
  httpx-ws==0.9.0
  wsproto==1.3.2
  kantoku==0.18.3
  pyzmq==27.3.0
  tornado==6.6.1
  opentelemetry-api==1.45.1
  opentelemetry-sdk==1.45.1
  opentelemetry-semantic-conventions==0.66b1
  opentelemetry-instrumentation==0.66b1
  opentelemetry-instrumentation-aiohttp-client==0.66b1
  opentelemetry-instrumentation-asgi==0.66b1
  opentelemetry-util-http==0.66b1
  pip-requirements-parser==32.0.1
  python-json-logger==4.2.0
  python-multipart==0.0.34
  rich-toolkit==0.20.6
  schema==0.7.8
  simple-di==0.1.5
  starlette==1.10.0
  tomli-w==1.2.0
  uvicorn==0.54.0
  watchfiles==1.3.0
)

# HUB2=1: the project's huggingface-hub pin, and what it drags in.
HUB2_WHEELS=(
  huggingface-hub==2.4.0
  httpx2==2.16.2
  httpcore2==2.16.2
  truststore==0.10.5
  transformers==5.23.0
  tokenizers==0.23.3
)
[[ "${HUB2:-0}" == 1 ]] && WHEELS+=("${HUB2_WHEELS[@]}")

# Compiled wheels re-zipped with LZMA (see Size above); names as in WHEELS.
REPACK=${REPACK-"torchao av diffusers pydantic-core bentoml pyzmq tornado watchfiles transformers tokenizers"}

# The device machine's `python3 -m pip list --format=freeze`, read there on 2026-11-23.
MACHINE="
absl-py==2.5.0 accelerate==1.15.0 aiofiles==25.1.0 aiohappyeyeballs==2.7.1 aiohttp==3.14.3
aiosignal==1.4.0 annotated-doc==0.0.5 anyio==4.15.1 attrs==26.1.0 botorch==0.18.1 build==1.6.1
certifi==2026.7.22 charset-normalizer==3.5.1 chex==0.1.92 click==8.5.0 cloudpickle==3.1.2
cmake==4.4.3 colorama==0.4.6 contourpy==1.4.0 coverage==7.16.2 cuda-bindings==13.3.1
cuda-core==1.2.0 cuda-pathfinder==1.8.1 cuda-toolkit==13.0.2 cupy-cuda13x==14.2.0 cycler==0.12.1
Cython==3.3.0 diffrax==0.7.2 e3nn==0.6.0 einops==0.8.2 equinox==0.13.8 etils==1.14.0
execnet==2.1.2 filelock==3.32.5 flatbuffers==25.12.19 flax==0.12.10 fonttools==4.66.1
formulaic==1.2.2 frozenlist==1.8.0 fsspec==2026.7.0 gpytorch==1.15.2 grpcio==1.84.0 h11==0.16.0
h5py==3.16.0 hf-xet==1.6.0 httpcore==1.0.9 httpx==0.28.1 huggingface_hub==1.33.0 humanize==4.16.0
hypothesis==6.168.3 idna==3.19 ImageIO==2.38.0 iniconfig==2.3.0 interface_meta==2.0.1 jax==0.11.2
jax-cuda13-pjrt==0.11.2 jax-cuda13-plugin==0.11.2 jaxlib==0.11.2 jaxtyping==0.3.11 Jinja2==3.1.6
joblib==1.6.0 kiwisolver==1.5.1 lazy-loader==0.6 lightning==2.6.6 lightning-utilities==0.15.3
linear_operator==0.6.1 lineax==0.1.1 llvmlite==0.50.0 lxml==6.1.3 Markdown==3.11
markdown-it-py==4.2.0 MarkupSafe==3.0.3 matplotlib==3.11.2 mdurl==0.1.2 meson==1.12.1
ml_dtypes==0.6.0 mpi4py==4.1.2 mpmath==1.3.0 msgpack==1.2.3 multidict==6.9.1
multipledispatch==1.0.0 mypy_extensions==1.1.0 nanobind==3.1.0 narwhals==2.26.0 networkx==3.6.1
ninja==1.13.2 numba==0.68.0 numba-cuda==0.30.4 numpy==2.5.2 numpyro==0.21.0
nvidia-cublas==13.1.0.3 nvidia-cuda-cupti==13.0.85 nvidia-cuda-nvrtc==13.0.88
nvidia-cuda-runtime==13.0.96 nvidia-cudnn-cu13==9.19.0.56 nvidia-cufft==12.0.0.61
nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 nvidia-cusolver==12.0.4.66
nvidia-cusparse==12.6.3.3 nvidia-cusparselt-cu13==0.8.0 nvidia-ml-py==13.610.43
nvidia-nccl-cu13==2.28.9 nvidia-nvjitlink==13.0.88 nvidia-nvshmem-cu13==3.4.5
nvidia-nvtx==13.0.85 onnx==1.23.1 onnx-ir==1.0.0 onnxruntime==1.30.0 onnxscript==0.7.2
opencv-python-headless==5.0.0.93 opt_einsum==3.4.0 opt-einsum-fx==0.1.4 optax==0.2.8
optimistix==0.1.0 orbax-checkpoint==0.12.4 packaging==26.3 pandas==3.0.6 pathspec==1.1.1
patsy==1.0.3 peft==0.21.0 pillow==12.3.0 pip==24.0 pluggy==1.6.0 portalocker==4.4.0
prometheus_client==0.26.0 propcache==0.5.4 protobuf==7.36.2 psutil==7.2.2 py-cpuinfo==9.0.0
pyarrow==25.0.1 pybind11==3.1.0 Pygments==2.21.0 pyparsing==3.3.3 pyproject_hooks==1.3.3
pyre-extensions==0.0.32 pytest==9.1.1 pytest-benchmark==5.2.3 pytest-cov==7.1.0
pytest-mock==3.16.0 pytest-timeout==2.5.0 pytest-xdist==3.8.0 python-dateutil==2.9.0.post0
pytorch-lightning==2.6.6 PyYAML==6.0.3 regex==2026.9.3 requests==2.34.2 rich==15.0.0
sacrebleu==2.6.0 safetensors==0.8.0 scikit_build_core==1.1.0 scikit-image==0.26.0
scikit-learn==1.9.1 scipy==1.18.1 seaborn==0.13.2 sentence-transformers==6.0.1
sentencepiece==0.2.2 setuptools==81.0.0 shellingham==1.5.4 simplejson==4.1.2 six==1.17.0
sortedcontainers==2.4.0 statsmodels==0.15.0 sympy==1.14.0 tabulate==0.10.0 tensorboard==2.21.0
tensorboard-data-server==0.7.2 tensorstore==0.1.85 threadpoolctl==3.7.0 tifffile==2026.9.20
tiktoken==0.14.0 timm==1.0.29 tokenizers==0.23.2 toolz==1.1.0 torch==2.11.0
torch-geometric==2.8.0.post1 torchaudio==2.11.0 torchdiffeq==0.2.5 torchmetrics==1.9.0
torchvision==0.26.0 tqdm==4.70.1 transformers==5.17.0 treescope==0.1.10 triton==3.6.0
typer==0.27.2 typing_extensions==4.16.0 typing-inspect==0.9.0 urllib3==2.7.0 uvloop==0.23.0
wadler_lindig==0.1.7 Werkzeug==3.1.9 wheel==0.48.0 wrapt==2.5.0 xarray==2026.9.0 xxhash==4.0.1
yarl==1.25.1 zipp==4.1.0
"

if [[ "${1:-}" != "--check" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
      --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 \
      --platform manylinux1_x86_64 \
      -d "$tmp/w" "${WHEELS[@]}" >"$tmp/pip.log" 2>&1; then
    grep -v "^WARNING: Location 'file:" "$tmp/pip.log" >&2
    exit 1
  fi
  mkdir -p "$WHL_DIR"
  rm -f "$WHL_DIR"/*.whl
  REPACK="$REPACK" WHL_TMP="$tmp/w" python3 - <<'PY'
import os, re, zipfile
from pathlib import Path
want = {re.sub(r"[-_.]+", "_", n).lower() for n in os.environ["REPACK"].split()}
for f in sorted(Path(os.environ["WHL_TMP"]).glob("*.whl")):
    if f.name.split("-")[0].lower() not in want:
        continue
    out = f.with_suffix(".lzma")
    with zipfile.ZipFile(f) as zi, zipfile.ZipFile(out, "w", zipfile.ZIP_LZMA) as zo:
        for info in zi.infolist():  # same names, order, dates and modes; only the compression differs
            data = zi.read(info)
            info.compress_type = zipfile.ZIP_LZMA
            zo.writestr(info, data)
    with zipfile.ZipFile(out) as z:  # read back: every member's CRC checks
        assert z.testzip() is None, out
    out.replace(f)
PY
  mv "$tmp"/w/*.whl "$WHL_DIR"/
fi

# Check: one wheel per package, each pinned wheel present, nothing forbidden, the size, and
# every Requires-Dist (no extras; markers for CPython 3.12 on Linux x86_64) of every carried
# wheel satisfied by a carried wheel or, failing that, by the machine's package.
WHEELS_LIST="${WHEELS[*]}" MACHINE="$MACHINE" WHL_DIR="$WHL_DIR" MAX_MIB="$MAX_MIB" python3 - <<'PY'
import os, re, sys, zipfile
from email.parser import Parser
from pathlib import Path
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
machine = dict(map(lambda s: (norm(s.split("==")[0]), s.split("==")[1]), os.environ["MACHINE"].split()))
pins = dict((norm(s.split("==")[0]), s.split("==")[1]) for s in os.environ["WHEELS_LIST"].split())
whl_dir = Path(os.environ["WHL_DIR"])
problems, carried, metas = [], {}, {}
for f in sorted(whl_dir.glob("*.whl")):
    with zipfile.ZipFile(f) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist()
                                             if n.endswith(".dist-info/METADATA")
                                             and n.count("/") == 1)).decode())
    name, ver = norm(meta["Name"]), meta["Version"]
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name]} and {ver}")
    carried[name], metas[name] = ver, meta
    if name in ("torch", "triton") or name.startswith("nvidia-"):
        problems.append(f"forbidden wheel carried: {f.name}")
    if pins.get(name) != ver:
        problems.append(f"{f.name}: not pinned in WHEELS (pinned: {pins.get(name)})")
for name, ver in pins.items():
    if name not in carried:
        problems.append(f"pinned but no wheel in {whl_dir}: {name}=={ver}")
missing = []
for name, meta in sorted(metas.items()):
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = norm(req.name)
        have, where = (carried[dep], "carried") if dep in carried else (machine.get(dep), "machine")
        if have is None:
            missing.append(f"{name} {carried[name]} needs {req}: absent")
        elif not req.specifier.contains(Version(have), prereleases=True):
            missing.append(f"{name} {carried[name]} needs {req}: {where} has {have}")
size = sum(f.stat().st_size for f in whl_dir.glob("*.whl"))
print(f"{len(carried)} wheels in {whl_dir}/, {size / 2**20:.1f} MiB")
shadow = [f"{n} {machine[n]} -> {v}" for n, v in sorted(carried.items()) if n in machine]
print("shadowing machine packages:", ", ".join(shadow) or "none")
if size > float(os.environ["MAX_MIB"]) * 2**20:
    problems.append(f"{whl_dir}/ is {size / 2**20:.1f} MiB, over {os.environ['MAX_MIB']} MiB")
for p in problems + missing:
    print("PROBLEM:", p)
print("missing requirements:", len(missing))
sys.exit(1 if problems or missing else 0)
PY
