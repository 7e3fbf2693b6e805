"""Property-based fuzzing of the served OpenAPI schema (schemathesis + hypothesis): whatever
a client sends to any operation, the server never answers 5xx."""

from __future__ import annotations

import collections

import schemathesis
from hypothesis import HealthCheck, given, settings


def test_fuzzed_requests_never_get_server_errors(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    statuses: collections.Counter = collections.Counter()
    operations = [(path, method.upper()) for path, item in schema.raw_schema["paths"].items()
                  for method in item]
    assert ("/generate", "POST") in operations
    for path, method in operations:
        examples = 60 if path == "/generate" else 10

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
