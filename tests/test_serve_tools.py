"""Tool calls through the server on the default model, as clients send them: the openai client's
tools / tool_choice (required, a named function, auto, none), streamed and not, a conversation that
carries a call and its result back, and LangChain's bind_tools and with_structured_output(method=
"function_calling"). Arguments are checked against each tool's JSON Schema with jsonschema."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from serve_live import serving  # noqa: E402

from llama2_onnx.assets import default_model_dir  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 30}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                      "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    with serving(default_model_dir(), max_batch=2, model_id=MODEL) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60), url


def valid(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    assert call.type == "function" and call.id.startswith("call_")
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls(client, choice):
    c, _ = client
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0,
                                  max_tokens=120, parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1 and ch.message.content is None
    valid(ch.message.tool_calls[0])
    if isinstance(choice, dict):
        assert ch.message.tool_calls[0].function.name == "add"


def test_streamed_call_equals_the_plain_one(client):
    c, _ = client
    plain = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                      max_tokens=120, parallel_tool_calls=False).choices[0].message.tool_calls[0]
    calls, reasons = {}, []  # as an OpenAI client adds up the deltas: by index, the arguments concatenated
    for chunk in c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                           max_tokens=120, parallel_tool_calls=False, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                got["name"] += (d.function.name or "") if d.function else ""
                got["arguments"] += (d.function.arguments or "") if d.function else ""
            reasons.append(ch.finish_reason)
    assert reasons[-1] == "tool_calls" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == (plain.function.name, plain.function.arguments)


def test_auto_and_none_answer_in_text(client):
    c, _ = client
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
    c, _ = client
    first = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                      max_tokens=120, parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    r = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0,
                                  max_tokens=30)
    alone = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result were read


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
])
def test_bad_tool_requests_are_400(client, body, param):
    import httpx

    _, url = client
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


def test_langchain_bind_tools_and_function_calling(client):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    _, url = client

    class Add(BaseModel):
        """Add two integers."""
        a: int = Field(ge=-1000, le=1000)
        b: int = Field(ge=-1000, le=1000)

    llm = lc.ChatOpenAI(base_url=url + "/v1", api_key="none", model=MODEL, temperature=0, max_tokens=120, max_retries=0)
    msg = llm.bind_tools([Add], tool_choice="required", parallel_tool_calls=False).invoke("What is 2 plus 3?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Add" and set(msg.tool_calls[0]["args"]) == {"a", "b"}
    got = llm.with_structured_output(Add, method="function_calling").invoke("What is 2 plus 3?")
    assert isinstance(got, Add)
