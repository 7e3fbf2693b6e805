"""The whole API in OpenAPI: every route a client can call, BentoML's and ours
(bentosvd/api/routes.py), is in the served /docs.json with its parameters and responses,
and what the routes answer fits the schemas given there."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from pydantic import TypeAdapter

from bentosvd.api.routes import ROUTES, JobState
from tests.conftest import ROOT, demo_env
from tests.test_jobs import submit, wait_finished

# Served, but not an API a client calls: the Swagger page, its assets, BentoML's internal
# schema, the web page's static files.
NOT_API = {"/", "/docs.json", "/schema.json", "/static_content", "/ui"}


@pytest.fixture(scope="module")
def spec(server) -> dict:
    response = httpx.get(f"{server.url}/docs.json", timeout=30)
    assert response.status_code == 200
    return response.json()


WALK = """
import json
from service import svc
print(json.dumps([[r.path, sorted(getattr(r, "methods", None) or [])] for r in svc.to_asgi().routes]))
"""


def app_routes(bentoml_home) -> set[tuple[str, str]]:
    """(path, method) of every route the API service's app serves, walked from the app (in
    a process of its own: importing the service reads the model store)."""
    done = subprocess.run([sys.executable, "-c", WALK], cwd=ROOT, env=demo_env(bentoml_home),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = set()
    for path, methods in json.loads(done.stdout.strip().splitlines()[-1]):
        assert methods or path in NOT_API, f"an app mounted at {path}: list its routes here"
        if path not in NOT_API:
            found |= {(path, method.lower()) for method in set(methods) - {"HEAD"}}
    for route in ROUTES:  # answered by the PlainRoutes middleware, ahead of the app
        found |= {(route.path, method.lower()) for method in route.methods - {"HEAD"}}
    return found


def test_every_route_is_in_the_schema(spec, bentoml_home):
    routes = app_routes(bentoml_home)
    assert {("/info", "get"), ("/jobs/{job_id}", "delete"), ("/generate", "post"),
            ("/image_to_video/submit", "post"), ("/image_to_video/get", "get")} <= routes
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert routes - documented == set(), f"routes missing from /docs.json: {routes - documented}"
    for path, method in routes:
        operation = spec["paths"][path][method]
        assert operation["responses"], (path, method)
        if "{job_id}" in path:
            assert [p["name"] for p in operation["parameters"]] == ["job_id"]


def test_answers_fit_the_schemas_given(spec, server, test_image):
    job = submit(server, test_image, {"seed": 1}).json()
    final, _ = wait_finished(server, job["id"])
    JobState.model_validate(final)  # the model the schema is made from
    schema = spec["components"]["schemas"]["JobState"]
    assert set(schema["required"]) == set(final)
    ref = spec["paths"]["/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ref["schema"]["$ref"] == "#/components/schemas/JobState"
    result = httpx.get(f"{server.url}{final['result_url']}", timeout=30)
    video_types = spec["paths"]["/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert result.headers["content-type"] in video_types
    missing = httpx.get(f"{server.url}/jobs/no-such-job", timeout=30)
    assert missing.status_code == 404
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) <= set(missing.json())
    TypeAdapter(dict).validate_python(json.loads(httpx.get(f"{server.url}/info").text))
