"""A local stand-in for the Hugging Face Hub, and tiny SVD repos to serve from it.

`FakeHub` is a real HTTP server (stdlib `http.server`, one thread per connection) serving the endpoints
huggingface_hub 2.4 calls for `snapshot_download` / `hf_hub_download`:

- `GET /api/models/{repo_id}/revision/{revision}`: model info (`sha`, `siblings`), public like the real
  hub's metadata of a gated repo;
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...`: the file listing snapshot_download
  filters with `allow_patterns` (`oid`, `size`, `lfs` for the safetensors files, never `xetHash`);
- `HEAD` / `GET /{repo_id}/resolve/{revision}/{path}`: the file, with `X-Repo-Commit`, `ETag` (git blob sha1,
  or the sha256 for LFS files along with `X-Linked-Etag` / `X-Linked-Size`), `Content-Length`,
  `Accept-Ranges`, and `Range: bytes=N-` answered with 206 + `Content-Range` (resume). No `X-Xet-*` header or
  `xetHash` is ever sent, so huggingface_hub downloads over plain HTTP even with hf_xet installed.

Gating follows the real hub: metadata is public; `/resolve` without a token gets 401 + `X-Error-Code:
GatedRepo`, with a token that has not been granted access 403 + `GatedRepo`; an unknown token gets 401 with
`X-Error-Message: Invalid credentials in Authorization header` on every endpoint. Unknown repo / revision /
file: 404 with `RepoNotFound` / `RevisionNotFound` / `EntryNotFound`.

Every request is logged (`hub.requests`), and faults can be queued per file (`hub.fail(...)`): "drop" sends
half the body then closes the connection, "503" answers 503, "cut" sends half the body and then the whole hub
goes away, as in a network outage: its port refuses connections and open connections are hung up on, until
`hub.start()` brings it back at the same URL.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GOOD_TOKEN = "hf_fake_granted_token"
NOT_GRANTED_TOKEN = "hf_fake_not_granted_token"

_LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")


# ------------------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _File:
    path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class _Repo:
    repo_id: str
    root: Path
    files: dict[str, _File]
    refs: dict[str, str]  # branch/tag -> commit
    gated: bool = True

    @property
    def commit(self) -> str:
        return self.refs["main"]


@dataclass
class Request:
    method: str
    path: str
    query: dict
    range: str | None
    authorization: str | None
    status: int = 0
    headers: dict = field(default_factory=dict)


def scan_repo(root: Path, repo_id: str, *, gated: bool = True) -> _Repo:
    """Index a directory as a hub repo (commit = hash of the file list and contents)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        files[rel] = _File(
            path=path,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            git_sha1=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            lfs=rel.endswith(_LFS_SUFFIXES),
        )
    commit = hashlib.sha1(json.dumps({k: f.sha256 for k, f in files.items()}, sort_keys=True).encode()).hexdigest()
    return _Repo(repo_id=repo_id, root=root, files=files, refs={"main": commit}, gated=gated)


class FakeHub:
    """Serve every `<root>/<org>/<name>/` folder as the model repo `<org>/<name>`."""

    def __init__(self, root: Path, *, tokens=(GOOD_TOKEN,), not_granted_tokens=(NOT_GRANTED_TOKEN,)):
        self.root = Path(root)
        self.tokens = set(tokens)
        self.not_granted_tokens = set(not_granted_tokens)
        self.repos: dict[str, _Repo] = {}
        for org in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for repo in sorted(p for p in org.iterdir() if p.is_dir()):
                repo_id = f"{org.name}/{repo.name}"
                self.repos[repo_id] = scan_repo(repo, repo_id)
        self.requests: list[Request] = []
        self._faults: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._port = 0  # 0 until the first start; then kept, so that a restart has the same URL
        self.offline = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)  # reuses the address
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self.offline = False
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        with self._lock:  # the test and a "cut" fault may stop it at the same time
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def go_offline(self) -> None:
        """The hub goes away (the "cut" fault): new connections are refused, open ones hung up on."""
        self.offline = True
        self.stop()

    @property
    def url(self) -> str:
        assert self._port, "FakeHub not started"
        return f"http://127.0.0.1:{self._port}"

    # -- test helpers ------------------------------------------------------------------------------------------

    def fail(self, repo_id: str, filename: str, *actions: str) -> None:
        """Queue faults for the next GETs of a file: "drop" (half the body, then close), "503", or "cut"
        (half the body, then the hub goes offline until `start()`)."""
        with self._lock:
            self._faults.setdefault((repo_id, filename), []).extend(actions)

    def _next_fault(self, repo_id: str, filename: str) -> str | None:
        with self._lock:
            queue = self._faults.get((repo_id, filename))
            return queue.pop(0) if queue else None

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def file_requests(self, method: str = "GET", repo_id: str | None = None) -> list[str]:
        """Repo paths requested through /resolve with `method` (one entry per request)."""
        out = []
        for r in list(self.requests):
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", r.path)
            if m and r.method == method and (repo_id is None or m.group(1) == repo_id):
                out.append(m.group(2))
        return out

    def add_ref(self, repo_id: str, ref: str, commit: str | None = None) -> None:
        repo = self.repos[repo_id]
        repo.refs[ref] = commit or repo.commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real hub; every answer has a Content-Length
    fake_hub: FakeHub

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        if self.fake_hub.offline:  # a request on a connection opened before the outage: hang up
            self._hang_up()
            return
        url = urlsplit(self.path)
        self.req = Request(
            method=method,
            path=unquote(url.path),
            query=parse_qs(url.query),
            range=self.headers.get("Range"),
            authorization=self.headers.get("Authorization"),
            headers=dict(self.headers),
        )
        self.fake_hub.log(self.req)
        self.method = method
        try:
            self._route(url.path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.req.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(body)

    def _json(self, data, headers: dict | None = None) -> None:
        self._send(200, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), h)

    # -- routing -----------------------------------------------------------------------------------------------

    def _route(self, raw_path: str) -> None:
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        token = None
        auth = self.headers.get("Authorization")
        if auth:
            token = auth.removeprefix("Bearer ").strip()
            if token not in self.fake_hub.tokens | self.fake_hub.not_granted_tokens:
                return self._error(401, None, "Invalid credentials in Authorization header")

        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models" and self.method == "GET":
            repo = self._repo(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            if len(parts) >= 6 and parts[4] == "revision":
                return self._model_info(repo, parts[5])
            if len(parts) >= 6 and parts[4] == "tree":
                return self._tree(repo, parts[5], "/".join(parts[6:]))
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(f"{parts[0]}/{parts[1]}")
            if repo is None:
                return
            return self._resolve(repo, parts[3], "/".join(parts[4:]), token)
        self._error(404, None, f"fake hub: no route for {self.method} {raw_path}")

    def _repo(self, repo_id: str) -> _Repo | None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> str | None:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.refs.values():
            return revision
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    def _model_info(self, repo: _Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        if commit is None:
            return
        self._json(
            {
                "_id": "fake",
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "library_name": "diffusers",
                "tags": ["diffusers", "image-to-video"],
                "siblings": [{"rfilename": name} for name in repo.files],
            }
        )

    def _tree(self, repo: _Repo, revision: str, prefix: str) -> None:
        commit = self._commit(repo, revision)
        if commit is None:
            return
        recursive = self.req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        entries, folders = [], set()
        for name, f in repo.files.items():
            if not name.startswith(base):
                continue
            rest = name[len(base) :]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            for i in range(rest.count("/")):
                folders.add(base + "/".join(rest.split("/")[: i + 1]))
            entry = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        folder_entries = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self._json(folder_entries + entries)

    def _resolve(self, repo: _Repo, revision: str, filename: str, token: str | None) -> None:
        if repo.gated:
            if token is None:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                )
            if token not in self.fake_hub.tokens:
                return self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo.repo_id} to ask for access.",
                )
        commit = self._commit(repo, revision)
        if commit is None:
            return
        f = repo.files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": commit})

        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["ETag"] = f'"{f.sha256}"'
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = f.size
        else:
            headers["ETag"] = f'"{f.git_sha1}"'
        if self.method == "HEAD":
            self.req.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(f.size))
            self.end_headers()
            return

        fault = self.fake_hub._next_fault(repo.repo_id, filename)
        if fault == "503":
            return self._error(503, None, "Service temporarily unavailable (fake hub fault)")

        data = f.path.read_bytes()
        status, start = 200, 0
        if self.req.range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.req.range.strip())
            if not m or int(m.group(1)) >= f.size:
                return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{f.size}"})
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else f.size - 1
            data = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{f.size}"

        self.req.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault in ("drop", "cut"):
            # Half the body, then the connection goes away: the client sees a short read.
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._hang_up()
            if fault == "cut":
                self.fake_hub.go_offline()
            return
        self.wfile.write(data)

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def closed_port_url() -> str:
    """URL of a local port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------------------------------------
# Tiny repos
# ------------------------------------------------------------------------------------------------------------

SVD_SCHEDULER_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    sigma_max=700.0,
    sigma_min=0.002,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    trained_betas=None,
    use_karras_sigmas=True,
)

# The frame-wise VAE in the image-decoder checkpoints. Deliberately not the same shape as the tiny temporal
# VAE (4 x 32 channels) so that the converter has to derive the architecture from the tensors.
TINY_IMAGE_VAE_CONFIG = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)


@dataclass
class TinyRepo:
    repo_id: str
    path: Path
    image_decoder_file: str | None
    image_vae_state: dict | None  # diffusers AutoencoderKL state dict (fp32) behind the image-decoder file
    original_file: str


def make_tiny_repo(
    root: Path,
    repo_id: str,
    *,
    image_decoder_file: str | None,
    original_file: str | None = None,
    seed: int = 0,
) -> TinyRepo:
    """Write `root/<repo_id>/` with the file layout of a Stability SVD repo and tiny random weights.

    fp16 diffusers files (what BentoSVD downloads), fp32 diffusers files and an original single-file
    checkpoint (`svd.safetensors`-like, which must never be fetched), and, when `image_decoder_file` is
    given, a single-file checkpoint whose `first_stage_model.*` keys hold a tiny AutoencoderKL in the
    original LDM naming (plus `model.diffusion_model.*` / `conditioner.*` junk keys).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    path = Path(root) / repo_id
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    torch.manual_seed(seed)

    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(1, 2),
        num_frames=4,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        sample_size=768,
        scaling_factor=0.18215,
        force_upcast=True,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )
    pipe.save_pretrained(path)  # fp32: diffusion_pytorch_model.safetensors, model.safetensors
    pipe.to(torch.float16).save_pretrained(path, variant="fp16")  # *.fp16.safetensors, same configs
    index = json.loads((path / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]  # as in the real repos
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    (path / "README.md").write_text(f"---\nlicense: other\n---\n# {repo_id} (tiny, random weights)\n")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")

    if original_file is None:
        original_file = image_decoder_file.replace("_image_decoder", "") if image_decoder_file else "svd.safetensors"
    junk = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 8, 3, 3),
        "model.diffusion_model.out.2.bias": torch.randn(4),
        "conditioner.embedders.0.open_clip.model.logit_scale": torch.randn(()),
    }
    save_file({**junk, "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3)}, path / original_file)

    image_vae_state = None
    if image_decoder_file is not None:
        image_vae = AutoencoderKL(**TINY_IMAGE_VAE_CONFIG, sample_size=768)
        image_vae_state = {k: v.detach().clone() for k, v in image_vae.state_dict().items()}
        ldm = diffusers_vae_to_ldm(image_vae_state, num_levels=len(TINY_IMAGE_VAE_CONFIG["block_out_channels"]))
        checkpoint = {f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()}
        checkpoint.update(junk)
        save_file(checkpoint, path / image_decoder_file)

    return TinyRepo(
        repo_id=repo_id,
        path=path,
        image_decoder_file=image_decoder_file,
        image_vae_state=image_vae_state,
        original_file=original_file,
    )


_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_vae_to_ldm(state: dict, *, num_levels: int) -> dict:
    """Inverse of diffusers' `convert_ldm_vae_checkpoint`: diffusers AutoencoderKL keys -> original LDM keys."""
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_ATTN_LDM[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # LDM uses 1x1 convolutions
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = value
    return out


TURBO_REPO = "wangfuyun/AnimateLCM-SVD-xt"


def make_tiny_turbo_repo(root: Path, base: TinyRepo, *, repo_id: str = TURBO_REPO, seed: int = 0) -> dict:
    """Write `root/<repo_id>/` as AnimateLCM-SVD-xt's authors publish it: at the repo's root, files each holding a
    whole fp32 state dict (diffusers' key names) of the UNet that `base`'s unet/config.json describes (1.1 and 1.0,
    different weights), a README, no diffusers folders. Returns {file name: its state dict}."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from safetensors.torch import save_file

    path = Path(root) / repo_id
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    config = json.loads((base.path / "unet" / "config.json").read_text())
    states = {}
    for i, name in enumerate(("AnimateLCM-SVD-xt-1.1.safetensors", "AnimateLCM-SVD-xt.safetensors")):
        torch.manual_seed(seed + i)
        unet = UNetSpatioTemporalConditionModel.from_config(config)
        states[name] = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
        save_file(states[name], path / name)
    (path / "README.md").write_text(f"---\nlicense: other\n---\n# {repo_id} (tiny, random weights)\n")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    return states
