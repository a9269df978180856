"""A bounded schemathesis run against the server's own OpenAPI schema: generated requests, valid
and invalid, to every route; no 5xx, and the server still serves after."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from serve_live import LiveServer  # noqa: E402

from llama2_onnx.serve.app import ServerState, create_app  # noqa: E402
from llama2_onnx.serve.service import Service  # noqa: E402

EXAMPLES = 150  # per generation mode: ~300 requests in all


@pytest.fixture(scope="module")
def live(tiny_onnx_ort):
    svc = Service.open(tiny_onnx_ort, max_batch=4, max_queue=16, model_id="tiny", provider="cpu")
    state = ServerState()
    state.attach(svc)
    try:
        with LiveServer(create_app(state, api_key="k", metrics=True)) as url:
            yield url
    finally:
        svc.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_5xx(live, mode):
    schema = schemathesis.openapi.from_url(live + "/openapi.json")
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=live, headers={"Authorization": "Bearer k"}, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.status_code != 422

    check()
    print(f"{mode.value}: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    assert len(statuses) >= EXAMPLES // 2
    assert httpx.get(live + "/health").status_code == 200
    r = httpx.post(live + "/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 2},
                   headers={"Authorization": "Bearer k"}, timeout=30)
    assert r.status_code == 200
