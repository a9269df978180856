"""Structured output and tool calls through the server on the default model, as clients send them:
the openai client's response_format (json_object, json_schema with strict; chat and completions;
streamed and not), llama-server's json_schema and grammar (GBNF) fields, LangChain's
with_structured_output, a 400 naming the field for a grammar that cannot be used; tools / tool_choice
(required, a named function, auto, none), streamed and not, a conversation that carries a call and
its result back, LangChain's bind_tools and with_structured_output(method="function_calling").
Arguments are checked against each tool's JSON Schema with jsonschema."""

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
    ({"json_schema": {"type": "bogus"}}, "json_schema"),
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


# ---- tools -----------------------------------------------------------------------------------------

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 30}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                      "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    assert call.type == "function" and call.id.startswith("call_")
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls(client, choice):
    c = client
    r = c.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice, temperature=0,
                                  max_tokens=120, parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1 and ch.message.content is None
    valid(ch.message.tool_calls[0])
    if isinstance(choice, dict):
        assert ch.message.tool_calls[0].function.name == "add"


def test_streamed_call_equals_the_plain_one(client):
    c = client
    plain = c.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                      max_tokens=120, parallel_tool_calls=False).choices[0].message.tool_calls[0]
    calls, reasons, logprobs = {}, [], []  # as an OpenAI client adds up the deltas: by index, the arguments concatenated
    for chunk in c.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                           max_tokens=120, parallel_tool_calls=False, stream=True, logprobs=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or None
        for ch in chunk.choices:
            logprobs += ch.logprobs.content if ch.logprobs else []
            for d in ch.delta.tool_calls or []:
                got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                got["name"] += (d.function.name or "") if d.function else ""
                got["arguments"] += (d.function.arguments or "") if d.function else ""
            reasons.append(ch.finish_reason)
    assert reasons[-1] == "tool_calls" and list(calls) == [0]
    assert len(logprobs) == usage.completion_tokens  # the held-back tokens' logprobs still go out
    assert (calls[0]["name"], calls[0]["arguments"]) == (plain.function.name, plain.function.arguments)


def test_auto_and_none_answer_in_text(client):
    c = client
    for choice in ("auto", "none"):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
                                      tool_choice=choice, temperature=0, max_tokens=20)
        ch = r.choices[0]
        assert (ch.message.tool_calls or []) == [] or choice == "auto"
        if not ch.message.tool_calls:
            assert ch.message.content and ch.finish_reason in ("stop", "length")
        else:
            valid(ch.message.tool_calls[0])
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS, tool_choice=choice,
            temperature=0, max_tokens=20, stream=True) if chunk.choices)
        assert streamed == (ch.message.content or "")


def test_a_call_and_its_result_go_back(client):
    c = client
    first = c.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                      max_tokens=120, parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    history = WEATHER_ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    r = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0,
                                  max_tokens=30)
    alone = c.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result were read


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
])
def test_bad_tool_requests_are_400(url, body, param):
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": WEATHER_ASK, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


def test_langchain_bind_tools_and_function_calling(url):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Add(BaseModel):
        """Add two integers."""
        a: int = Field(ge=-1000, le=1000)
        b: int = Field(ge=-1000, le=1000)

    llm = lc.ChatOpenAI(base_url=url + "/v1", api_key="none", model=MODEL, temperature=0, max_tokens=120, max_retries=0)
    msg = llm.bind_tools([Add], tool_choice="required", parallel_tool_calls=False).invoke("What is 2 plus 3?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Add" and set(msg.tool_calls[0]["args"]) == {"a", "b"}
    from langchain_core.messages import HumanMessage, ToolMessage

    final = llm.bind_tools([Add], tool_choice="none").invoke(
        [HumanMessage("What is 2 plus 3?"), msg, ToolMessage("5", tool_call_id=msg.tool_calls[0]["id"])])
    assert final.content and not final.tool_calls  # the round trip: call, result, answer
    got = llm.with_structured_output(Add, method="function_calling").invoke("What is 2 plus 3?")
    assert isinstance(got, Add)
