"""From laptop to cluster: `bentoml build` makes a Bento that serves the blog's curl,
`bentoml containerize` gets a CUDA image context with the models in it, and the BentoCloud and
Kubernetes files under deploy/ are valid for their schemas and agree with the service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import typing
from pathlib import Path
from types import SimpleNamespace

import attr
import httpx
import kubernetes_validate
import pytest
import yaml
from typing_extensions import is_typeddict

from bentosvd.config import VARIANTS, Settings
from tests.conftest import BIN, ROOT
from tests.test_service import DEMO, assert_video, run_blog_curl

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# torch==2.13.0's Linux wheel on PyPI requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13 (its
# METADATA), so the image is CUDA 13.0. A torch bump fails test_dockerfile until that is checked.
TORCH_PIN, TORCH_CUDA = "torch==2.13.0", "13.0"
TIMEOUT = Settings.model_fields["timeout"].default
# Any download during `bentoml build` fails: the build must work offline.
OFFLINE = {key: "http://127.0.0.1:9" for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}


def bentoml_cli(*args: str, env: dict, cwd: Path = ROOT) -> str:
    done = subprocess.run([str(BIN / "bentoml"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"bentoml {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def bento(bentoml_home) -> SimpleNamespace:
    """`bentoml build` in the repo, as the README says, with the demo model in the store."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "MODEL_VERSION": "demo",
           "BENTOML_DO_NOT_TRACK": "true", **OFFLINE}
    out = bentoml_cli("build", env=env)
    tag = re.search(r'Successfully built Bento\(tag="(svd-service:[a-z0-9]+)"\)', out)
    assert tag, out
    info = json.loads(bentoml_cli("get", "svd-service:latest", "-o", "json", env=env))
    path = bentoml_home / "bentos" / "svd-service" / info["version"]
    dockerfile = (path / "env/docker/Dockerfile").read_text()
    return SimpleNamespace(tag=tag[1], info=info, path=path, env=env, home=bentoml_home,
                           dockerfile=dockerfile)


def dockerfile_value(dockerfile: str, instruction: str, name: str) -> str:
    """The value of `ENV name=...` or `ARG name=...` in a generated Dockerfile."""
    found = re.search(rf"^{instruction} {name}=(\S+)$", dockerfile, re.M)
    assert found, f"no {instruction} {name} in the Dockerfile"
    return found[1]


def test_build_gives_tagged_bento(bento):
    assert bento.tag == f"svd-service:{bento.info['version']}"  # and it is svd-service:latest


def test_bento_has_code_models_and_pinned_requirements(bento):
    src = bento.path / "src"
    for name in ["service.py", "config.py", "import_model.py", "bentoml_configuration.yaml"]:
        assert (src / name).is_file(), name
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bentosvd").rglob("*.py")}
    assert {p.relative_to(src).as_posix() for p in (src / "bentosvd").rglob("*.py")} == package
    assert {p.name for p in (src / "bentosvd" / "client" / "ui").iterdir()} == {
        p.name for p in (ROOT / "bentosvd" / "client" / "ui").iterdir()}
    # Benchmarks, tests and docs stay out of the Bento.
    assert not any((src / name).exists() for name in ("benchmarks", "tests", "docs", "scripts"))
    # Every module of the repo that the service's code imports travels with it.
    for module in src.glob("*.py"):
        for name in re.findall(r"^(?:from|import) (\w+)", module.read_text(), re.M):
            if (ROOT / f"{name}.py").exists() or (ROOT / name).is_dir():
                assert (src / f"{name}.py").exists() or (src / name).is_dir(), f"{module.name} imports {name}"

    # The models: the variant served, the image encoder it was registered with and the RIFE
    # model (the demo registers one), exact versions.
    worker = next(s for s in bento.info["services"] if s["name"] == "GenerationWorker")
    expected = {f"{name}:{(bento.home / 'models' / name / 'latest').read_text().strip()}"
                for name in (DEMO.store_name, DEMO.image_encoder_name, "rife")}
    assert {m["tag"] for m in worker["models"]} == expected

    requirements = (bento.path / "env/python/requirements.txt").read_text().splitlines()
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all("==" in pin and pin in requirements for pin in pins), requirements
    assert TORCH_PIN in pins


def test_dockerfile(bento):
    dockerfile = bento.dockerfile
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-\S+", dockerfile, re.M)
    assert base and base[1] == TORCH_CUDA, f"the image's CUDA must be torch's ({TORCH_PIN}: {TORCH_CUDA})"
    lines = dockerfile.replace("\\\n", " ").splitlines()  # continuation lines joined
    installs = " ".join(line for line in lines if "apt-get install" in line).split()
    assert "ffmpeg" in installs and "curl" in installs  # curl: the HEALTHCHECK's
    assert "EXPOSE 3000" in lines
    assert any(re.match(r"HEALTHCHECK .* CMD curl -fsS http://localhost:3000/livez ", line) for line in lines)
    # BentoML's CUDA template has no pip for its `pip install uv`: uv must come first.
    assert dockerfile.index("/uv /usr/local/bin/uv") < dockerfile.index("command -v uv")
    # The bentofile's envs are the image's defaults; BENTOML_CONFIG names a file of the Bento.
    assert dockerfile_value(dockerfile, "ARG", "MODEL_VERSION") in VARIANTS
    config = dockerfile_value(dockerfile, "ARG", "BENTOML_CONFIG")
    bento_path = dockerfile_value(dockerfile, "ARG", "BENTO_PATH")
    assert config.startswith(bento_path + "/")
    assert (bento.path / config.removeprefix(bento_path + "/")).is_file()


FAKE_DOCKER = """#!/usr/bin/env bash
# Stand-in for the docker CLI: passes BentoML's version check, keeps what `build` is given.
if [ "$1" = version ]; then echo '"27.0.0"'; exit 0; fi
mkdir -p "$FAKE_DOCKER_OUT" && printf '%s\\n' "$@" > "$FAKE_DOCKER_OUT/args"
cp -r "${@: -1}" "$FAKE_DOCKER_OUT/context"
"""


def test_containerize_builds_with_the_models_in_the_context(bento, tmp_path):
    """`bentoml containerize` up to `docker build`: what that gets is the image's content."""
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir()
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    out = tmp_path / "out"
    env = {**bento.env, "PATH": f"{docker.parent}{os.pathsep}{os.environ['PATH']}",
           "FAKE_DOCKER_OUT": str(out)}
    # From /: BentoML 1.4.39 refuses a dockerfile_template outside the working directory, and
    # its build context is a temporary directory.
    bentoml_cli("containerize", "svd-service:latest", env=env, cwd=Path("/"))
    context = out / "context"
    for name in (DEMO.store_name, DEMO.image_encoder_name):
        version = (bento.home / "models" / name / "latest").read_text().strip()
        assert (context / "models" / name / version / "model.yaml").is_file(), name
    assert (context / "src/service.py").is_file()
    dockerfile = (context / "env/docker/Dockerfile").read_text()  # generated again by containerize
    assert re.search(rf"^FROM nvidia/cuda:{re.escape(TORCH_CUDA)}\.", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "COPY --chown=bentoml:bentoml . ./" in dockerfile
    args = (out / "args").read_text().splitlines()
    assert args[0] == "build" and "svd-service:" + bento.info["version"] in args


@pytest.fixture(scope="module")
def served(bento, server_factory, tmp_path_factory):
    """The built Bento served by name, from a directory with none of the repo in it."""
    server = server_factory(args=["svd-service:latest"], cwd=tmp_path_factory.mktemp("elsewhere"),
                            PYTHONPATH="")
    yield server
    server.stop()


def test_built_bento_answers_the_blog_curl(served, test_image, tmp_path):
    headers, video = run_blog_curl(served, test_image, tmp_path)
    assert "x-model: demo" in headers
    assert_video(video, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    assert 'from "svd-service:latest"' in served.log.read_text()


def test_built_bento_serves_the_web_page_and_info(served):
    page = httpx.get(f"{served.url}/ui/", timeout=30)
    assert page.status_code == 200 and "<script" in page.text
    assert httpx.get(f"{served.url}/ui/app.js", timeout=30).status_code == 200
    assert httpx.get(f"{served.url}/info", timeout=30).json()["model"] == "demo"


# --- BentoCloud -----------------------------------------------------------------------------

def unknown_keys(data, cls, where: str = "") -> list[str]:
    """Keys in `data` that the attrs class or TypedDict `cls` (and those in it) does not know.
    BentoML's cloud schemas silently drop unknown keys, so a typo would do nothing."""
    if not isinstance(data, dict):
        return []
    hints = typing.get_type_hints(cls)
    found = []
    for key, value in data.items():
        if key not in hints:
            found.append(f"{where}{key}")
            continue
        kind = hints[key]
        while typing.get_origin(kind) in (typing.Union, typing.Annotated):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is list and isinstance(value, list):
            items = [(f"{where}{key}[{i}].", v, args[0]) for i, v in enumerate(value)]
        elif origin is dict and isinstance(value, dict):
            items = [(f"{where}{key}.{k}.", v, args[1]) for k, v in value.items()]
        else:
            items = [(f"{where}{key}.", value, kind)]
        for path, item, item_cls in items:
            item_cls = next((a for a in typing.get_args(item_cls) if a is not type(None)), item_cls)
            if attr.has(item_cls) or is_typeddict(item_cls):
                found += unknown_keys(item, item_cls, path)
    return found


def test_bentocloud_config_fits_bentoml_schema_and_service(bento):
    from _bentoml_sdk.service.config import ServiceConfig, validate
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    config = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    bentoml_cattr.structure(config, CreateDeploymentSchema)  # what `bentoml deploy -f` sends
    assert unknown_keys(config, CreateDeploymentSchema) == []
    assert set(config["services"]) == {s["name"] for s in bento.info["services"]}
    for name, service in config["services"].items():
        overrides = service["config_overrides"]
        assert unknown_keys(overrides, ServiceConfig, f"{name}.config_overrides.") == []
        validate(overrides)  # types and bounds of BentoML's service config
        assert overrides["traffic"]["timeout"] == TIMEOUT, name
        assert service["scaling"]["min_replicas"] == 0
    assert config["services"]["GenerationWorker"]["instance_type"].startswith("gpu")
    envs = {e["name"]: e["value"] for e in config["envs"]}
    assert envs["MODEL_VERSION"] in VARIANTS
    assert config["secrets"] == ["bentosvd"]  # API_KEYS and JOBS_DATABASE_URL, not in the file
    assert not {"API_KEYS", "JOBS_DATABASE_URL"} & envs.keys()


# --- Kubernetes -----------------------------------------------------------------------------

def manifests() -> dict[str, dict]:
    docs = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())]
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path):
    """Strict schema (unknown fields fail) of the oldest and newest Kubernetes the package has."""
    versions = kubernetes_validate.utils.all_versions()
    for doc in yaml.safe_load_all(path.read_text()):
        for version in (versions[0], versions[-1]):
            kubernetes_validate.validate(doc, version, strict=True)


def container_port(container: dict, port) -> int:
    return port if isinstance(port, int) else next(
        p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_manifests_agree_with_the_service_and_the_image(bento):
    k8s = manifests()
    assert set(k8s) == {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "Job"}
    deployment, pod = k8s["Deployment"], k8s["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    assert all(container_port(container, p["port"]) == 3000 for p in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # compiling takes minutes
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    # SIGTERM comes after preStop; then a request in flight may take up to TIMEOUT.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(sleep[1]) + TIMEOUT

    # The model store mounted where BentoML looks in the image: $BENTOML_HOME/models.
    home = dockerfile_value(bento.dockerfile, "ENV", "BENTOML_HOME")
    mounts = {m["mountPath"].rstrip("/"): m for m in container["volumeMounts"]}
    assert mounts[str(Path(home) / "models")]["subPath"] == "models"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {e["name"] for e in container["env"]} <= {name.upper() for name in Settings.model_fields}
    cache = env["COMPILE_CACHE_DIR"]
    assert any(cache.startswith(path + "/") and not m.get("readOnly") for path, m in mounts.items())
    # Replicas share the jobs: the folder on the shared volume, writable; the database URL
    # and the API keys from secrets, never written in the manifest.
    assert mounts[env["JOBS_DIR"]]["subPath"] == "jobs" and not mounts[env["JOBS_DIR"]].get("readOnly")
    assert k8s["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(secrets) == {"JOBS_DATABASE_URL", "API_KEYS"}
    assert all(not ref.get("optional") for ref in secrets.values())
    uid = int(dockerfile_value(bento.dockerfile, "ARG", "BENTO_USER_UID"))
    assert pod["spec"]["securityContext"]["runAsUser"] == uid

    claim = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    job = k8s["Job"]["spec"]["template"]["spec"]
    for spec in (pod["spec"], job):
        assert [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]] == [claim]
    # The Job fills the same store: its $BENTOML_HOME is the volume's root, so models/ there.
    (job_container,) = job["containers"]
    job_env = {e["name"]: e.get("value") for e in job_container["env"]}
    assert job_env["BENTOML_HOME"] == job_container["volumeMounts"][0]["mountPath"]
    assert job_env["MODEL_VERSION"] == env["MODEL_VERSION"] in VARIANTS
    assert job_container["image"] == container["image"]

    service = k8s["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert container_port(container, service["ports"][0]["targetPort"]) == 3000

    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in service_gauges()


def service_gauges() -> set[str]:
    source = (ROOT / "bentosvd" / "metrics.py").read_text()
    return set(re.findall(r'bentoml\.metrics\.Gauge\(\s*name="(\w+)"', source))


def test_hpa_metric_is_exported_by_the_served_bento(served):
    (metric,) = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in service_gauges()
    metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert re.search(rf"^# TYPE {name} gauge$", metrics, re.M), metrics[-2000:]
