#!/usr/bin/env bash
# On the GPU ("device") machine, from the repo root with .whl/ carried (scripts/device_wheels.sh):
#   source scripts/device_bench.sh && python3 -m bentosvd.bench ...
# installs the carried wheels once per machine and sets the environment the benchmark runs in.
if [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $(ls .whl/*.whl | grep -v torchao) || return 1
  # torchao in a folder of its own (as in the earlier runs; only the FP8 modes import it).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ao .whl/torchao-*.whl || return 1
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/ao:/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=/root/inductor PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
