#!/usr/bin/env bash
# On the GPU ("device") machine, from the repo root with .whl/ carried (scripts/device_wheels.sh):
#   source scripts/device_bench.sh && python3 -m benchmarks.bench ...
#   source scripts/device_bench.sh && python3 -m benchmarks.probes.fallback --out $OUT/fallback.json
# installs the carried wheels once per machine and sets the environment the benchmark runs in.
# Installed as pip installs the Bento's requirements, byte-compiled: after a --no-compile
# install, a restart's log (run q) still showed torchao's sources being compiled on import,
# so nothing had kept their bytecode from the first start.
if [ ! -e /tmp/site/.done2 ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
    --target /tmp/site $(ls .whl/*.whl | grep -v torchao) || return 1
  # torchao in a folder of its own, kept off PYTHONPATH: the Bento does not install it
  # (FP8 is opt-in) and diffusers imports it whenever it can, so a server started with it
  # would time imports the deployed one never makes. FP8 runs put it in front:
  #   PYTHONPATH=$TORCHAO_PATH:$PYTHONPATH python3 -m benchmarks.bench --modes fp8 ...
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
    --target /tmp/ao .whl/torchao-*.whl || return 1
  touch /tmp/site/.done2
fi
export PYTHONPATH=/tmp/site:$PWD TORCHAO_PATH=/tmp/ao TORCHINDUCTOR_CACHE_DIR=/root/inductor PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
