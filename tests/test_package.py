"""The package stands on its own: it imports nothing from the repository's top-level files,
so it works wherever it is installed, with or without the repository root on the path."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_package_imports_without_the_repository_root_on_the_path(tmp_path):
    (tmp_path / "bentosvd").symlink_to(ROOT / "bentosvd")
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in (ROOT / "bentosvd").rglob("*.py") if p.name != "__init__.py")
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(tmp_path / "home")}
    # bentosvd.worker.service looks its models up in the store when imported: not here.
    code = code.replace("importlib.import_module('bentosvd.worker.service')\n", "")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(modules) > 30
