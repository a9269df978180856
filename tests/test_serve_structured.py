"""Structured output through the server on the default model, as clients send it: the openai client's
response_format (json_object, json_schema with strict; chat and completions; streamed and not),
llama-server's json_schema and grammar (GBNF) fields, LangChain's with_structured_output, and a 400
naming the field for a grammar that cannot be used."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from serve_live import serving  # noqa: E402

from llama2_onnx.assets import default_model_dir  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}}}
ASK = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]


@pytest.fixture(scope="module")
def url():
    with serving(default_model_dir(), max_batch=2, max_queue=8, model_id=MODEL) as (u, _):
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_chat_json_schema_strict(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY)


def test_chat_json_object_streamed(client):
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=0.7, seed=4,
                                            stream=True, response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("{")
    try:
        assert isinstance(json.loads(text), dict)
    except json.JSONDecodeError:  # cut by max_tokens: still a prefix of a JSON object
        assert len(text) > 100


def test_completions_with_llama_server_fields(url):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0,
            "grammar": 'root ::= " " ("Paris" | "Lyon" | "Nice") "."'}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["text"] in (" Paris.", " Lyon.", " Nice."), r
    body = {"model": MODEL, "prompt": "A city as JSON:", "max_tokens": 60, "temperature": 0, "json_schema": CITY}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    jsonschema.validate(json.loads(r["choices"][0]["text"]), CITY)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "response_format"),
    ({"grammar": "root ::= undefined_rule"}, "grammar"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_unusable_grammar_is_a_400(url, body, param):
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and "\n" not in err["message"]


def test_langchain_with_structured_output(url):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=20)
        country: str = Field(max_length=20)

    llm = lc.ChatOpenAI(base_url=url + "/v1", api_key="none", model=MODEL, temperature=0, max_tokens=80, max_retries=0)
    got = llm.with_structured_output(City, method="json_schema", strict=True).invoke("The capital of France, as JSON.")
    assert isinstance(got, City) and got.city
    raw = llm.with_structured_output(method="json_mode").invoke(
        "Return a JSON object with one key, city, naming the capital of France.")
    assert isinstance(raw, dict) and raw
