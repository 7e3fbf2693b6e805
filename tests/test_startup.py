"""What `bentoml serve` and the API service import: not torch, diffusers or transformers.

Both import service.py (and through it worker.py) but never run the model; only the GPU
worker's process needs torch. Importing it costs seconds per process (5 s here, more with
CUDA's libraries), and a restart is timed to /readyz (issue 3's ≤ 60 s)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_importing_the_service_does_not_import_torch(bentoml_home):
    check = ("import sys, service; heavy = sorted({'torch', 'diffusers', 'transformers'} & "
             "set(sys.modules)); print(heavy); sys.exit(1 if heavy else 0)")
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "MODEL_VERSION": "demo",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
