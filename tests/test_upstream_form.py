"""The upstream BentoSVD sample's clients (bentosvd/api/upstream_form.py), against the real
server: the exact curl of its README gets a valid MP4, its fields mean what ours mean, and
a name given both ways is a 400 naming both."""

from __future__ import annotations

import json
import shlex
import subprocess

import httpx
import pytest

from tests.test_service import DEMO, assert_video, post

# The upstream README's curl, as it is written there (only the image's path and the output
# file differ, and the host: filled in below).
UPSTREAM_CURL = """curl -X 'POST' \\
  'http://localhost:3000/generate' \\
  -H 'accept: */*' \\
  -H 'Content-Type: multipart/form-data' \\
  -F 'image=@assets/sample.png;type=image/png' \\
  -F 'decode_chunk_size=2' \\
  -F 'seed=null' \\
  -o generated.mp4"""


def test_the_upstream_readmes_curl_gets_a_valid_mp4(server, test_image, tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "sample.png").write_bytes(test_image.read_bytes())
    command = UPSTREAM_CURL.replace("http://localhost:3000", server.url)
    args = shlex.split(command.replace("\\\n", " "))
    done = subprocess.run([*args, "-sS", "-w", "%{http_code}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "200", (done.stdout, done.stderr,
                                                          (tmp_path / "generated.mp4").read_bytes()[:300])
    assert_video((tmp_path / "generated.mp4").read_bytes(), frames=DEMO.num_frames, fps=7,
                 size=(DEMO.width, DEMO.height))


def upstream(server, image, fields: dict, **files):
    with image.open("rb") as f:
        return httpx.post(f"{server.url}/generate", data=fields, timeout=120,
                          files={"image": (image.name, f, "image/png"), **files})


def test_its_fields_mean_what_ours_mean(server, test_image):
    theirs = upstream(server, test_image, {"decode_chunk_size": "2", "seed": "42"})
    assert theirs.status_code == 200, theirs.text
    assert theirs.headers["x-seed"] == "42"
    ours = post(server, test_image, {"decoding_t": 2, "seed": 42})
    assert ours.content == theirs.content
    # With params beside them, the rest of params still counts.
    both = upstream(server, test_image, {"seed": "42", "params": json.dumps({"decoding_t": 2})})
    assert both.status_code == 200 and both.content == ours.content


@pytest.mark.parametrize("fields,files,named", [
    ({}, {"img": ("x.png", b"", "image/png")}, "'img' and as 'image'"),
    ({"decode_chunk_size": "2", "params": json.dumps({"decoding_t": 2})}, {}, "decode_chunk_size"),
    ({"seed": "1", "params": json.dumps({"seed": 2})}, {}, "params.seed"),
])
def test_a_name_given_both_ways_is_a_400_naming_both(server, test_image, fields, files, named):
    response = upstream(server, test_image, fields, **files)
    assert response.status_code == 400, response.text
    body = response.json()
    assert named in body["message"] and body["fix"], body


@pytest.mark.parametrize("value", ["abc", "1.5", "x" * 100])
def test_a_field_that_is_not_a_number_is_a_400_naming_it(server, test_image, value):
    response = upstream(server, test_image, {"decode_chunk_size": value})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "decode_chunk_size"


def test_its_values_get_our_bounds(server, test_image):
    response = upstream(server, test_image, {"decode_chunk_size": "0"})
    assert response.status_code == 400 and response.json()["field"] == "params.decoding_t"
