#!/usr/bin/env bash
# Build the CPU demo image from the Bento without a Docker engine (docs/deploy.md, "Build and
# run the image without Docker"): Debian's buildah, chroot isolation, a base image made from
# Debian packages with mmdebstrap. Start it with scripts/run_image.sh; tests/test_image.py
# checks it.
#
#   bash scripts/build_image.sh          # prints the image's name and id at the end
#
# 1. Installs buildah, mmdebstrap, socat and iproute2 with apt-get when missing.
# 2. The base image ($BASE_IMAGE, once; REBUILD_BASE=1 makes it again): Debian bookworm by
#    mmdebstrap with bentofile.yaml's Python (python3.11), its system_packages (ffmpeg), curl
#    (the HEALTHCHECK's) and pip. BentoML installs nothing into a custom base image, so the base
#    brings what its own Debian template would have installed.
# 3. The Bento, in a model store of its own ($IMAGE_WORK/bentoml): the demo model registered
#    (import_model.py --if-missing), then `bentoml build` with bentofile.yaml's settings except
#    `docker:`, which names the base image and a CPU template holding deploy/Dockerfile.template's
#    HEALTHCHECK block. bentofile.yaml itself stays the CUDA image's.
# 4. `bentoml containerize --backend buildah` (run from /, as docs/deploy.md says), with
#    BUILDAH_ISOLATION=chroot, --layers (a rebuild reuses the pip layer) and
#    BUILDAH_FORMAT=docker: the OCI format has no HEALTHCHECK and buildah drops it. The
#    build's pip and uv reach the package mirror through this machine's pip configuration,
#    mounted into each RUN step only (containers.conf `volumes`): nothing of it is in the image
#    but the empty folders it was mounted on.
#
# Needs root (buildah's storage, chroot, mounts). Settings (environment):
#   IMAGE=localhost/bentosvd:demo  BASE_IMAGE=localhost/bentosvd-base:bookworm
#   IMAGE_WORK=/var/tmp/bentosvd-image (the Bento's model store, the base's tarball, logs)
#   DEBIAN_MIRROR=http://deb.debian.org/debian  REBUILD_BASE=1  VENV=.venv (bentoml, pip)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${IMAGE:-localhost/bentosvd:demo}
BASE_IMAGE=${BASE_IMAGE:-localhost/bentosvd-base:bookworm}
WORK=${IMAGE_WORK:-/var/tmp/bentosvd-image}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
BENTOML=$VENV/bin/bentoml
say() { echo "build_image: $*"; }
die() { echo "build_image: $*" >&2; exit 1; }
step_start=$SECONDS
timed() { say "$1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }

[ "$(id -u)" -eq 0 ] || {
  command -v sudo >/dev/null && sudo -n true 2>/dev/null && exec sudo -n -E bash "$0" "$@"
  die "needs root (buildah's storage, chroot and mounts), or sudo without a password"
}
[ -x "$BENTOML" ] || die "no $BENTOML: run make install first"
mkdir -p "$WORK"

# --- 1. Tools -------------------------------------------------------------------------------
missing=()
for tool in buildah:buildah mmdebstrap:mmdebstrap socat:socat ip:iproute2 nsenter:util-linux; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  log=$WORK/apt.log
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "apt-get failed (log above)"
  fi
fi
say "$(buildah --version), $(mmdebstrap --version)"

# What bentofile.yaml says the image has: its Python and its system packages.
read -r PYVER SYSTEM_PACKAGES < <("$PY" - <<'EOF'
import yaml
docker = yaml.safe_load(open("bentofile.yaml"))["docker"]
print(docker["python_version"], ",".join(docker.get("system_packages") or []))
EOF
)

# --- 2. The base image ----------------------------------------------------------------------
if [ -n "${REBUILD_BASE:-}" ] || ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  packages="python$PYVER,python3,python3-pip,ca-certificates,curl${SYSTEM_PACKAGES:+,$SYSTEM_PACKAGES}"
  say "making $BASE_IMAGE: mmdebstrap bookworm with $packages"
  rm -f "$WORK/base.tar"
  # /etc/xdg is where the build's pip and uv configuration is mounted (step 4); resolv.conf and
  # hostname are this machine's, copied in by mmdebstrap.
  mmdebstrap --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/etc/resolv.conf "$1"/etc/hostname; mkdir -p "$1"/etc/xdg' \
    bookworm "$WORK/base.tar" \
    "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
    "deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main" >"$WORK/mmdebstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed (log above)"; }
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$WORK/base.tar" / >/dev/null
  buildah config --env LANG=C.UTF-8 --cmd '["/bin/bash"]' \
    --label "org.opencontainers.image.description=Debian bookworm (mmdebstrap): $packages" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  rm -f "$WORK/base.tar"
  timed "made $BASE_IMAGE"
else
  say "$BASE_IMAGE already there (REBUILD_BASE=1 makes it again)"
fi

# --- 3. The Bento ---------------------------------------------------------------------------
export BENTOML_HOME=$WORK/bentoml BENTOML_DO_NOT_TRACK=true MODEL_VERSION=demo
"$PY" import_model.py --if-missing >"$WORK/import.log" 2>&1 \
  || { tail -n 30 "$WORK/import.log" >&2; die "import_model.py failed (log above)"; }
# The CPU template: deploy/Dockerfile.template's HEALTHCHECK block on BentoML's own base
# template (the CUDA template's other blocks name the CUDA image and bring uv from ghcr.io).
"$PY" - "$WORK" "$BASE_IMAGE" <<'EOF'
import os, re, sys
from pathlib import Path

import yaml

work, base = Path(sys.argv[1]), sys.argv[2]
template = Path("deploy/Dockerfile.template").read_text()
block = re.search(r"\{% block SETUP_BENTO_ENTRYPOINT %\}.*?\{% endblock %\}", template, re.S)
assert block and "HEALTHCHECK" in block[0], "no HEALTHCHECK block in deploy/Dockerfile.template"
(work / "Dockerfile.cpu.template").write_text(
    "{# Written by scripts/build_image.sh from deploy/Dockerfile.template #}\n"
    "{% extends bento_base_template %}\n" + block[0] + "\n")
bentofile = yaml.safe_load(Path("bentofile.yaml").read_text())
docker = bentofile["docker"]
# A path relative to the build context: BentoML refuses an absolute one (bentoml build runs
# from /, below, which it requires of a template outside the project).
relative = os.path.relpath(work / "Dockerfile.cpu.template", Path.cwd())
bentofile["docker"] = {"base_image": base, "python_version": docker["python_version"],
                       "dockerfile_template": relative}
(work / "bentofile.cpu.yaml").write_text(
    "# Written by scripts/build_image.sh: bentofile.yaml with the CPU demo image's docker: section\n"
    + yaml.safe_dump(bentofile, sort_keys=False))
EOF
# One Bento in this store: the one built now.
"$BENTOML" delete svd-service --yes >/dev/null 2>&1 || true
(cd / && "$BENTOML" build -f "$WORK/bentofile.cpu.yaml" "$ROOT") >"$WORK/bento.log" 2>&1 \
  || { tail -n 30 "$WORK/bento.log" >&2; die "bentoml build failed (log above)"; }
BENTO=$(grep -o 'svd-service:[a-z0-9]*' "$WORK/bento.log" | head -n 1)
timed "built the Bento $BENTO (BENTOML_HOME=$BENTOML_HOME)"

# --- 4. The image ---------------------------------------------------------------------------
# This machine's pip configuration (index, extra indexes, find-links, certificate bundle), for
# the build's pip (pip.conf) and uv (uv.toml), and the local folders it names, mounted read-only.
SITE=$WORK/site
rm -rf "$SITE" && mkdir -p "$SITE/xdg/pip" "$SITE/xdg/uv"
"$PY" - "$SITE" "$VENV/bin/pip" <<'EOF'
import json, os, re, subprocess, sys
from pathlib import Path
from urllib.parse import unquote, urlparse

site, pip = Path(sys.argv[1]), sys.argv[2]
found = {}
listed = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=True).stdout
for line in listed.splitlines():  # global.find-links='/opt/wheels', :env:.cert='...'
    key, _, value = line.partition("=")
    found[key.split(".", 1)[1]] = value.strip("'\"")
for name in ("index-url", "extra-index-url", "find-links", "cert", "trusted-host"):
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        found[name] = env
split = lambda name: found.get(name, "").split()
mounts = set()
def local(location):
    """A local path or file:// URL: its folder is mounted at the same path in the build."""
    path = unquote(urlparse(location).path) if location.startswith("file:") else location
    if path.startswith("/") and os.path.exists(path):
        # A simple index's pages link to the files beside it (../files/…): its parent too.
        mounts.add(os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path)
    return location
index = found.get("index-url")
extra = [local(u) for u in split("extra-index-url")]
links = [local(u) for u in split("find-links")]
cert = found.get("cert") or "/etc/ssl/certs/ca-certificates.crt"
pip_conf = ["[global]", "break-system-packages = true",  # the base's pip is Debian's
            "cert = /etc/ssl/certs/ca-certificates.crt"]
if index: pip_conf.append(f"index-url = {index}")
if extra: pip_conf.append("extra-index-url = " + " ".join(extra))
if links: pip_conf.append("find-links = " + " ".join(links))
if found.get("trusted-host"): pip_conf.append(f"trusted-host = {found['trusted-host']}")
(site / "xdg/pip/pip.conf").write_text("\n".join(pip_conf) + "\n")
# uv: pip's choice among indexes (the best version anywhere), the system's certificates.
uv = ["system-certs = true", "", "[pip]", 'index-strategy = "unsafe-best-match"']
if index: uv.append(f"index-url = {json.dumps(index)}")
if extra: uv.append(f"extra-index-url = {json.dumps(extra)}")
if links: uv.append(f"find-links = {json.dumps(links)}")
(site / "xdg/uv/uv.toml").write_text("\n".join(uv) + "\n")
volumes = [f"{site / 'xdg'}:/etc/xdg:ro", f"{cert}:/etc/ssl/certs/ca-certificates.crt:ro"]
volumes += [f"{path}:{path}:ro" for path in sorted(mounts)]
(site / "containers.conf").write_text("[containers]\nvolumes = " + json.dumps(volumes) + "\n")
EOF
# uv as the CUDA image has it (deploy/Dockerfile.template copies it from ghcr.io's uv image):
# BentoML's template runs `pip install uv` when the base has none.
uv_version=$(grep -o 'astral-sh/uv:[0-9.]*' deploy/Dockerfile.template | cut -d: -f2)
[ -n "$uv_version" ] && { echo "uv==$uv_version" >"$SITE/xdg/pip/constraints.txt"
  echo "constraint = /etc/xdg/pip/constraints.txt" >>"$SITE/xdg/pip/pip.conf"; }

say "containerizing $BENTO into $IMAGE with buildah (chroot isolation); log: $WORK/containerize.log"
# --opt: passed to `buildah build` as --layers, --force-rm (no container left by a failed step).
(cd / && CONTAINERS_CONF=$SITE/containers.conf BUILDAH_ISOLATION=chroot BUILDAH_FORMAT=docker \
   "$BENTOML" containerize "$BENTO" --backend buildah -t "$IMAGE" \
   --opt build-arg=MODEL_VERSION=demo --opt layers --opt force-rm) >"$WORK/containerize.log" 2>&1 \
  || { tail -n 40 "$WORK/containerize.log" >&2; die "bentoml containerize failed (log above)"; }
# The previous build's image, now untagged, and its containers' leftovers.
buildah rmi --prune >/dev/null 2>&1 || true
timed "containerized"
buildah images --format '{{.Name}}:{{.Tag}} {{.ID}} {{.Size}}' "$IMAGE"
