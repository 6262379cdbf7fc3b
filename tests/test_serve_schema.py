"""schemathesis against the served OpenAPI document: no operation answers 5xx, whatever it is sent.

Every operation in /openapi.json (the /v1 API and the HF endpoint) gets requests generated from its schema,
valid and invalid (wrong types, out-of-range numbers, NUL characters, unknown fields), with an admin token so
that each reaches its route code rather than stopping at the auth check. Few examples per operation: the aim is
a crash that any odd input shows (an unbounded integer that overflows the database, a string PostgreSQL
refuses), not an exhaustive search.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from safetensors.numpy import save_file

from serving import make_token, serve_in_thread

from registry import Registry
from registry.importer import import_folder

pytestmark = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)

EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 12, schemathesis.GenerationMode.NEGATIVE: 8}


def test_no_operation_answers_a_server_error(home, tmp_path, monkeypatch):
    # A pull job resolves its revision on the endpoint: point it at a closed local port (fails at once).
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    reg = Registry()
    reg.init()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": np.ones((4, 4), np.float32)}, str(model / "model.safetensors"))
    import_folder(reg, model, "acme/tiny")
    # A name schemathesis will not guess: DELETE /v1/tokens/{name} must not revoke the token it runs with.
    auth = {"Authorization": f"Bearer {make_token(reg, 'admin', 'schemathesis-admin-q7x2')}"}
    failures: list[str] = []
    with serve_in_thread(reg) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=auth)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15, [op.label for op in operations]
        for operation in operations:
            for mode, examples in EXAMPLES.items():
                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def call(case):
                    response = case.call(base_url=url, headers=auth, timeout=30)
                    if response.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path} query={case.query} body={case.body!r}"
                                        f" -> {response.status_code} {response.text[:300]}")

                try:
                    call()
                except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
                    assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n".join(failures[:20])
