"""Property-based fuzzing of the served OpenAPI schema (schemathesis + hypothesis), and of
the `params` field with hostile JSON: whatever a client sends, the server never answers 5xx.

Both runs are seeded (FUZZ_SEED), so a failure replays with the same examples."""

from __future__ import annotations

import collections
import json

import httpx
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

FUZZ_SEED = 20261202


def test_fuzzed_requests_never_get_server_errors(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    statuses: collections.Counter = collections.Counter()
    operations = [(path, method.upper()) for path, item in schema.raw_schema["paths"].items()
                  for method in item]
    assert ("/generate", "POST") in operations
    for path, method in operations:
        examples = 60 if path == "/generate" else 10

        @seed(FUZZ_SEED)
        @given(case=schema[path][method].as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            response = case.call(timeout=120)
            statuses[(path, response.status_code)] += 1
            assert response.status_code < 500, (path, response.status_code, response.text[:300])

        check()
    print(f"\nfuzz statuses: {dict(sorted(statuses.items()))}")  # for docs/RELIABILITY.md
    assert sum(n for (p, _), n in statuses.items() if p == "/generate") >= 30


# JSON of any shape, with numbers of any size and nesting past the server's limits.
_scalars = (st.none() | st.booleans() | st.integers(min_value=-10**60, max_value=10**60)
            | st.floats(allow_nan=False) | st.text(max_size=30))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=20)
_deep = st.builds(lambda n, open_, close, tail: open_ * n + tail + close * n,
                  st.integers(1, 3000), st.sampled_from(["["]), st.sampled_from(["]"]),
                  st.sampled_from(["", "1", '"x"']))
_params_text = st.one_of(
    st.builds(json.dumps, _json),
    st.builds(lambda v: json.dumps({"seed": v}), _json),
    st.builds(lambda d: '{"seed": ' + d + "}", _deep),
    st.builds(lambda n: '{"seed": ' + "9" * n + "}", st.integers(1, 6000)),
)
_params_bytes = st.one_of(st.builds(str.encode, _params_text), st.binary(max_size=64))


def test_hostile_params_never_get_server_errors(server, test_image):
    image = test_image.read_bytes()
    statuses: collections.Counter = collections.Counter()

    @seed(FUZZ_SEED)
    @given(params=_params_bytes)
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(params):
        response = httpx.post(f"{server.url}/generate", timeout=120,
                              files={"img": ("i.png", image, "image/png"),
                                     "params": (None, params)})
        statuses[response.status_code] += 1
        assert response.status_code < 500, (params[:200], response.status_code, response.text)
        if response.status_code >= 400:
            assert {"error", "message"} <= set(response.json())

    check()
    print(f"\nhostile params statuses: {dict(sorted(statuses.items()))}")
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= 40
