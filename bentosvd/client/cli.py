"""Command-line client for a BentoSVD server: one image (`generate`) or a folder (`batch`).

    python -m bentosvd.client.cli generate cat.png --seed 42
    python -m bentosvd.client.cli batch photos/ videos/ --concurrency 2

It speaks the HTTP contract of README.md with httpx and imports no BentoML. The parameter
flags (`--fps-id`, `--seed`, ...) are made from `config.Params`, so a field added there
gets its flag, bounds and help here without a change; `--param key=value` sends anything
else as it is. The server checks every value.

A failure is one paragraph on stderr (`error: ...`); when an exception is behind it, a last
line says that `--debug` (or BENTOSVD_DEBUG=1, as for import_model.py) shows its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import traceback
import types
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
from pydantic import BaseModel

from bentosvd.config import Params
from bentosvd.weights.importer import DEBUG_ENV  # the one switch for import_model.py and this

DEFAULT_URL = "http://localhost:3000"
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                  ".webp": "image/webp"}
# 429: the queue is full; 503: the GPU ran out of memory, or a server (or the proxy in front
# of it) is starting; 502: a proxy lost its upstream. Other answers would come back the same.
RETRY_STATUSES = {429, 502, 503}
FIRST_BACKOFF = 0.5  # seconds before the first retry when the server gives no Retry-After
MAX_WAIT = 60.0  # longest pause between tries, whatever Retry-After says
CONNECT_TIMEOUT = 10.0
DEBUG_HINT = f"(--debug or {DEBUG_ENV}=1 shows the traceback)"


class GenerationFailed(Exception):
    """No video for this image; `reason` says why, in the server's words where it answered.

    `stops_batch`: the next images would fail the same way (the params were refused, or the
    server stayed unreachable through every retry), so a batch sends no more."""

    def __init__(self, reason: str, *, stops_batch: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.stops_batch = stops_batch


@dataclass
class Video:
    data: bytes
    seed: int | None  # from X-Seed
    model: str | None  # from X-Model
    warning: str | None  # from X-Model-Warning (the demo model)


class SVDClient:
    """Sends images to `POST /generate`, retrying what a later try can fix.

    `url`: the server's base URL. `timeout`: seconds to wait for one answer (the server stops
    a generation at its own TIMEOUT, 300 s by default, and answers 504 first). `retries`: tries
    after the first on 429/502/503 and connection errors; each waits `retry_delay`.
    `connections`: requests in flight at most. Use as `async with SVDClient(...) as client`.
    """

    def __init__(self, url: str, *, timeout: float = 600.0, retries: int = 5, connections: int = 2,
                 api_key: str | None = None):
        self.url = url
        self.timeout = timeout
        self.retries = retries
        # The server's API_KEYS, or BentoCloud's token for its protected endpoints.
        token = api_key or os.environ.get("BENTOSVD_API_KEY") or os.environ.get("BENTOSVD_TOKEN")
        self.http = httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=connections),
            headers={"Authorization": f"Bearer {token}"} if token else None)

    async def __aenter__(self) -> SVDClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def check_reachable(self) -> None:
        """Raise `GenerationFailed` if nothing answers at `url`; any HTTP answer will do."""
        try:
            await self.http.get("/readyz", timeout=CONNECT_TIMEOUT)
        except httpx.TransportError as e:
            raise GenerationFailed(
                f"cannot reach the server at {self.url} ({describe(e)}). Is it running "
                f"(`make serve`)? Pass --url or set BENTOSVD_URL.") from e

    async def generate(self, image: Path, params: dict, on_retry=None) -> Video:
        """One image → its video. Raises `GenerationFailed` with the server's message.

        `on_retry(what_failed, seconds, next_try)` is called before each wait between tries."""
        try:
            upload = image.read_bytes()
        except OSError as e:
            raise GenerationFailed(f"cannot read the image: {e}") from e
        # A neutral name: the server needs none, and a long one would be refused (400).
        suffix = image.suffix.lower()
        files = {"img": (f"image{suffix}", upload, IMAGE_SUFFIXES.get(suffix, "image/png"))}
        data = {"params": json.dumps(params)}
        attempt = 0
        while True:
            attempt += 1
            cause = None  # the connection error of this try, for --debug's traceback
            try:
                response = await self.http.post("/generate", files=files, data=data)
            except httpx.TimeoutException as e:
                if not isinstance(e, httpx.ConnectTimeout):
                    # The server may still be busy with it: another try would wait as long.
                    raise GenerationFailed(
                        f"no answer within {self.timeout:g} s (--timeout)") from e
                what, retry_after, unreachable = f"connection failed ({describe(e)})", None, True
                cause = e
            except httpx.TransportError as e:
                what, retry_after, unreachable = f"connection failed ({describe(e)})", None, True
                cause = e
            else:
                if response.status_code == 200 and response.content:
                    return Video(response.content, _int_or_none(response.headers.get("x-seed")),
                                 response.headers.get("x-model"),
                                 response.headers.get("x-model-warning"))
                failure = failure_from(response)
                if response.status_code not in RETRY_STATUSES:
                    raise failure
                what, retry_after = failure.reason, response.headers.get("retry-after")
                unreachable = False
            if attempt > self.retries:
                raise GenerationFailed(
                    f"{what}; gave up after {attempt} tries (--retries {self.retries})",
                    stops_batch=unreachable) from cause
            delay = retry_delay(attempt, retry_after)
            if on_retry is not None:
                on_retry(what, delay, attempt + 1)
            await asyncio.sleep(delay)


def retry_delay(attempt: int, retry_after: str | None, rng: random.Random = random) -> float:
    """Seconds to wait after failed try number `attempt` (1-based).

    The server's `Retry-After` (seconds or an HTTP date) when it sent one, else 0.5 s doubling
    each try; capped at MAX_WAIT; then up to 25 % more, at random, so clients turned away
    together do not all come back in the same instant (never less: the server said when).
    """
    wait = parse_retry_after(retry_after)
    if wait is None:
        wait = FIRST_BACKOFF * 2 ** (attempt - 1)
    return min(wait, MAX_WAIT) * rng.uniform(1.0, 1.25)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def failure_from(response: httpx.Response) -> GenerationFailed:
    """The server's error answer as one line: its `message` (+ `fix`), or the field and
    message of each of BentoML's validation errors (`detail`), or the start of the body."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    params_refused = False
    if isinstance(body, dict) and body.get("message"):
        text = str(body["message"])
        if body.get("fix"):
            text += f" (fix: {body['fix']})"
        params_refused = status < 500 and str(body.get("field", "")).startswith("params")
    elif isinstance(body, dict) and isinstance(body.get("detail"), list):
        problems = []
        for d in body["detail"]:
            loc = ".".join(str(part) for part in d.get("loc", [])) if isinstance(d, dict) else ""
            msg = d.get("msg", d) if isinstance(d, dict) else d
            problems.append(f"{loc}: {msg}" if loc else str(msg))
            params_refused |= status < 500 and loc.startswith("params")
        text = "; ".join(problems) or str(body.get("error", ""))
    else:
        text = response.text.strip()[:200] or response.reason_phrase or "empty answer"
    if status == 401:  # every other image would be refused the same way
        text += "; pass --api-key or set BENTOSVD_API_KEY"
    return GenerationFailed(f"HTTP {status}: {text}", stops_batch=params_refused or status == 401)


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --- what to send, and where the videos go ----------------------------------------------------


def parse_param(text: str) -> tuple[str, object]:
    """`key=value` → (key, value); the value is read as JSON when it is JSON (`seed=null`,
    `cond_aug=0.1`), else taken as a string (`format=webm`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def video_suffix(params: dict) -> str:
    return "." + str(params.get("format") or "mp4")


def find_images(folder: Path, *, recursive: bool = False,
                exclude: Path | None = None) -> list[Path]:
    """PNG, JPEG and WebP files in `folder` (any case), sorted; hidden files (macOS `._x.png`)
    and anything under `exclude` (the output folder, if it is inside) are left out."""
    found = []
    for path in folder.rglob("*") if recursive else folder.iterdir():
        rel = path.relative_to(folder)
        if (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                and not any(part.startswith(".") for part in rel.parts)
                and not (exclude and path.resolve().is_relative_to(exclude.resolve()))):
            found.append(path)
    return sorted(found)


@dataclass
class Job:
    image: Path
    video: Path
    name: str  # the image's path relative to the input folder, for messages

    @property
    def sidecar(self) -> Path:
        return self.video.with_suffix(".json")


def plan_batch(images: list[Path], images_dir: Path, videos_dir: Path, suffix: str) -> list[Job]:
    """One job per image: `videos_dir/<relative folder>/<stem><suffix>`.

    Raises ValueError when two images would write the same video (`a.png` and `a.jpg`) or a
    video would overwrite an image, before anything is sent."""
    jobs, by_video = [], defaultdict(list)
    inputs = {image.resolve() for image in images}
    for image in images:
        rel = image.relative_to(images_dir)
        video = videos_dir / rel.with_suffix(suffix)
        jobs.append(Job(image, video, str(rel)))
        by_video[video.resolve()].append(str(rel))
    clashes = [f"{', '.join(names)} → {video.name}"
               for video, names in by_video.items() if len(names) > 1]
    clashes += [f"{job.name} → {job.video} would overwrite an input image"
                for job in jobs if job.video.resolve() in inputs]
    if clashes:
        raise ValueError("these images would write the same file; rename them or choose "
                         "another output folder:\n  " + "\n  ".join(clashes))
    return jobs


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run leaves no
    half-written file that a re-run would take for finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a video is not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


# --- batch ------------------------------------------------------------------------------------


@dataclass
class Summary:
    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # image → reason
    started: float = field(default_factory=time.monotonic)

    def report(self, interrupted: bool = False) -> str:
        seconds = time.monotonic() - self.started
        counts = (f"done {len(self.done)}, skipped {len(self.skipped)}, "
                  f"failed {len(self.failed)} in {seconds:.1f} s")
        if interrupted:
            left = self.total - len(self.done) - len(self.skipped) - len(self.failed)
            counts = (f"interrupted: {counts}; {left} not done (the same command finishes "
                      "them)")
        lines = [counts]
        by_reason = defaultdict(list)
        for name, reason in self.failed.items():
            by_reason[reason].append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:10])
            if len(names) > 10:
                shown += f" and {len(names) - 10} more"
            lines.append(f"  failed: {shown}: {reason}")
        return "\n".join(lines)


class Progress:
    """A tqdm bar on a terminal; otherwise (logs, CI, pipes) one plain line per event."""

    def __init__(self, total: int, done_before: int, stream=sys.stderr):
        self.total, self.count, self.stream = total, done_before, stream
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done_before, unit="video", file=stream,
                            dynamic_ncols=True)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def finished(self, line: str, *, failed: bool = False) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            if failed:  # the bar shows progress; a failure must stay on screen
                self.bar.write(line, file=self.stream)
        else:
            self.note(f"[{self.count}/{self.total}] {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_batch(jobs: list[Job], client: SVDClient, params: dict, *, concurrency: int,
                    summary: Summary, progress: Progress) -> None:
    """Send `jobs` with at most `concurrency` requests in flight, writing each video (and its
    `<stem>.json`: seed, params and model, to make it again) as it arrives. A failure that
    every next image would share (`GenerationFailed.stops_batch`) stops it."""
    pending = iter(jobs)
    stopped_by = None  # the image whose failure stopped the batch
    warned = False

    async def worker() -> None:
        nonlocal warned, stopped_by
        for job in pending:  # one iterator shared by the workers: each job is taken once
            if stopped_by:
                summary.failed[job.name] = f"not sent: the batch stopped at {stopped_by}"
                continue
            started = time.monotonic()

            def on_retry(what, delay, attempt, name=job.name):
                progress.note(f"{name}: {what}; try {attempt} of {client.retries + 1} "
                              f"in {delay:.1f} s")

            try:
                video = await client.generate(job.image, params, on_retry=on_retry)
                record = {"image": job.name, "seed": video.seed, "model": video.model,
                          "params": {**params, "seed": video.seed}}
                try:
                    write_atomically(job.sidecar, (json.dumps(record, indent=2) + "\n").encode())
                    # Last: a video on disk means its record is there too.
                    write_atomically(job.video, video.data)
                except OSError as e:
                    raise GenerationFailed(f"cannot write the video: {e}") from None
            except GenerationFailed as e:
                summary.failed[job.name] = e.reason
                progress.finished(f"{job.name}: failed: {e.reason}", failed=True)
                if e.stops_batch:
                    stopped_by = stopped_by or job.name
                continue
            if video.warning and not warned:
                warned = True
                progress.note(f"warning: {video.warning}")
            summary.done.append(job.name)
            progress.finished(f"{job.name}: done in {time.monotonic() - started:.1f} s "
                              f"(seed {video.seed})")

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, concurrency)):
            group.create_task(worker())


# --- command line -----------------------------------------------------------------------------


def add_param_flags(parser: argparse.ArgumentParser, model: type[BaseModel] = Params) -> None:
    """One flag per field of `model` (`fps_id` → `--fps-id`), typed, with its bounds and
    default in the help. Flags left out are not sent, so the server's defaults apply."""
    group = parser.add_argument_group("video parameters (left out: the server's default)")
    for name, info in model.model_fields.items():
        kind, choices = _flag_type(info.annotation)
        bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata
                  for attr, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
                  if getattr(m, attr, None) is not None]
        extra = ", ".join(bounds + [f"default {json.dumps(info.default)}"])
        metavar = None if choices else {int: "N", float: "X"}.get(kind, "VALUE")
        help_text = f"{info.description or ''} [{extra}]".replace("%", "%%")
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"param_{name}", type=kind,
                           choices=choices, default=None, metavar=metavar, help=help_text)
    group.add_argument("--param", dest="extra_params", action="append", type=parse_param,
                       default=[], metavar="KEY=VALUE",
                       help="send any other params field as it is (VALUE is read as JSON if it "
                       "parses, e.g. seed=null); repeatable; wins over the flags above")


def _flag_type(annotation) -> tuple[typing.Callable, list | None]:
    """int, float, str, bool or Literal[...], optionally `| None` → (argparse type, choices)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return _bool, [True, False]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    return (annotation if annotation in (int, float, str) else str), None


def _bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def params_from(args: argparse.Namespace, model: type[BaseModel] = Params) -> dict:
    params = {name: getattr(args, f"param_{name}") for name in model.model_fields
              if getattr(args, f"param_{name}", None) is not None}
    params.update(dict(args.extra_params))
    return params


def build_parser(model: type[BaseModel] = Params) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bentosvd.client.cli",
        description="Turn images into videos with a BentoSVD server.")
    commands = parser.add_subparsers(dest="command", required=True)

    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=os.environ.get("BENTOSVD_URL", DEFAULT_URL),
                        help="the server (default: $BENTOSVD_URL or %(default)s)")
    server.add_argument("--api-key", default=None, metavar="KEY",
                        help="the server's API key, sent as a Bearer token (default: "
                        "$BENTOSVD_API_KEY, else $BENTOSVD_TOKEN for BentoCloud)")
    server.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for one video (default %(default)g)")
    server.add_argument("--retries", type=_non_negative, default=5, metavar="N",
                        help="tries after the first on 429/502/503 and connection errors, "
                        "waiting as Retry-After says (default %(default)s)")
    server.add_argument("--debug", action="store_true",
                        help=f"on a failure, show the traceback too (also: {DEBUG_ENV}=1)")

    one = commands.add_parser("generate", parents=[server], help="one image → one video",
                              description="Turn one image into a video; prints the seed used.")
    one.add_argument("image", type=Path, metavar="IMAGE")
    one.add_argument("-o", "--output", type=Path, metavar="OUT", help="where to write the "
                     "video (default: <image stem>.<format> beside the image)")
    add_param_flags(one, model)

    many = commands.add_parser(
        "batch", parents=[server], help="every image in a folder → a video each",
        description="Turn every PNG, JPEG and WebP image in IMAGES_DIR into a video in "
        "VIDEOS_DIR: <stem>.mp4 (or the format's extension), and <stem>.json with the seed and "
        "params used. Images whose video exists are skipped, so an interrupted run picks up "
        "where it stopped. Exit code 0 only if none failed.")
    many.add_argument("images_dir", type=Path, metavar="IMAGES_DIR")
    many.add_argument("videos_dir", type=Path, metavar="VIDEOS_DIR")
    many.add_argument("--concurrency", type=_positive, default=2, metavar="N",
                      help="requests in flight at once (default %(default)s; the server runs one "
                      "per GPU and queues MAX_QUEUE more)")
    many.add_argument("--recursive", action="store_true",
                      help="also images in sub-folders (their videos go to the same sub-folders)")
    add_param_flags(many, model)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 all videos written; 1 some failed, or an unexpected error; 2 bad usage or
    no server; 130 Ctrl-C. Whatever fails prints one paragraph on stderr, never a traceback
    unless --debug (or BENTOSVD_DEBUG=1) asks for it."""
    args = build_parser().parse_args(argv)
    args.debug = args.debug or bool(os.environ.get(DEBUG_ENV))
    args.url = args.url.rstrip("/")
    if not args.url.startswith(("http://", "https://")):
        return _usage_error(f"--url must start with http:// or https://, got {args.url!r}")
    params = params_from(args)
    try:
        command = generate_command if args.command == "generate" else batch_command
        return asyncio.run(command(args, params))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # not one the commands expect (a malformed --url, a bug): still one paragraph
        return fail(describe(_innermost(e)), e, debug=args.debug)


async def generate_command(args, params: dict) -> int:
    if not args.image.is_file():
        return _usage_error(f"no such image: {args.image}")
    output = args.output or args.image.with_suffix(video_suffix(params))
    if output.resolve() == args.image.resolve():
        return _usage_error(f"{output} is the input image; choose another name with -o")

    def on_retry(what, delay, attempt):
        print(f"{what}; try {attempt} of {args.retries + 1} in {delay:.1f} s", file=sys.stderr)

    started = time.monotonic()
    async with SVDClient(args.url, timeout=args.timeout, retries=args.retries, api_key=args.api_key,
                         connections=1) as client:
        try:
            await client.check_reachable()
        except GenerationFailed as e:
            return fail(e.reason, e, debug=args.debug, code=2)
        try:
            video = await client.generate(args.image, params, on_retry=on_retry)
            write_atomically(output, video.data)
        except OSError as e:
            return fail(f"cannot write {output}: {e}", e, debug=args.debug)
        except GenerationFailed as e:
            return fail(e.reason, e, debug=args.debug)
    if video.warning:
        print(f"warning: {video.warning}", file=sys.stderr)
    print(f"wrote {output} in {time.monotonic() - started:.1f} s, seed {video.seed}")
    return 0


async def batch_command(args, params: dict) -> int:
    if not args.images_dir.is_dir():
        return _usage_error(f"no such folder: {args.images_dir}")
    images = find_images(args.images_dir, recursive=args.recursive, exclude=args.videos_dir)
    try:
        jobs = plan_batch(images, args.images_dir, args.videos_dir, video_suffix(params))
    except ValueError as e:
        return _usage_error(str(e))
    summary = Summary(total=len(jobs))
    todo = []
    for job in jobs:
        if job.video.is_file() and job.video.stat().st_size > 0:
            summary.skipped.append(job.name)
        else:
            todo.append(job)
    if summary.skipped:
        print(f"skipping {len(summary.skipped)} images whose videos exist", file=sys.stderr)

    async with SVDClient(args.url, timeout=args.timeout, retries=args.retries, api_key=args.api_key,
                         connections=args.concurrency) as client:
        if todo:
            try:
                await client.check_reachable()
            except GenerationFailed as e:
                return fail(e.reason, e, debug=args.debug, code=2)
        progress = Progress(len(jobs), len(summary.skipped))
        try:
            await run_batch(todo, client, params, concurrency=args.concurrency,
                            summary=summary, progress=progress)
        except asyncio.CancelledError:  # Ctrl-C: the requests in flight were cancelled
            progress.close()
            print(summary.report(interrupted=True))
            raise
        progress.close()
    print(summary.report())
    return 1 if summary.failed else 0


def _usage_error(message: str) -> int:
    """A mistake in the command line itself (no exception behind it): the message, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def fail(message: str, error: BaseException, *, debug: bool, code: int = 1) -> int:
    """Print the one paragraph for a failure `error` caused and return the exit code: the
    message, then how to see the traceback; with `debug`, the traceback first."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    if not debug:
        print(DEBUG_HINT, file=sys.stderr)
    return code


def _innermost(error: BaseException) -> BaseException:
    """The one error inside a group of one (asyncio's and anyio's task groups wrap them)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
