"""Request schemas, validated once and shared by the HTTP routes and `llama2-onnx score`.

    req = parse(ChatCompletionRequest, body)      # a dict from JSON; raises APIError(400) naming the field

Every model forbids unknown fields and coerces nothing (strict: "1" is not a number, true is
not an integer), so a field we do not implement is a 400 naming it, never a silent ignore.
What is checked here is what can be checked without the model: types, ranges, which fields go
together. What needs the tokenizer (context length, token ids in the vocabulary) is checked in
serve.service.

OpenAI fields implemented (chat and completions): model, max_tokens, max_completion_tokens
(chat), temperature, top_p, stop, seed, stream, stream_options.include_usage, n (choice k samples
with seed + k), logprobs/top_logprobs (chat), logprobs as an integer and echo (completions),
presence_penalty, frequency_penalty and logit_bias (OpenAI's rules, on the generated tokens),
response_format (json_object, json_schema with strict: constrained decoding, runtime/grammar.py);
messages with content as text parts, the developer role and name; completions prompts as text or
token ids. `user`, `store`, `metadata` and `service_tier` are accepted and ignored. Extensions, as
vLLM and llama-server name them: top_k, repetition_penalty, cache_prompt, json_schema and grammar
(GBNF). Tools and tool_choice are ChatCompletionRequest's (serve/tools.py renders and parses them).
Everything else (images, audio) is a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.grammar import Grammar
from llama2_onnx.runtime.sequence import stop_strings

from .errors import APIError, ParamError, bad_request, from_validation

MAX_STOP = 4  # stop strings per request, OpenAI's limit
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_N = 16  # choices per prompt
MAX_ROWS = 64  # prompts x n in one request
MAX_BIAS = 300  # logit_bias entries, OpenAI's limit
MAX_SCORE_INPUTS = 16  # input_string entries in one /score request


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    """OpenAI's message: content a string or a list of text parts (joined); "developer" is the system
    role of newer models; name is accepted and not shown to the model; an assistant message's
    tool_calls and a `tool` message's result go to the model as serve/tools.py writes them."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ParamError("content", "content is required (null only for an assistant message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ParamError("tool_calls", "only assistant messages carry tool_calls")
        return self

    def as_message(self) -> dict:
        from .tools import call_text, result_text

        c = self.content
        text = "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)
        if self.tool_calls:
            calls = "\n".join(call_text(t.function.name, t.function.arguments) for t in self.tool_calls)
            text = f"{text}\n{calls}" if text else calls
        if self.role == "tool":
            return {"role": "user", "content": result_text(text)}
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


def _check_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    try:
        stops = stop_strings(stop)  # the runtime's one rule (a string is one stop string; none empty)
    except UserError as e:
        raise ValueError(str(e)) from None
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
    return tuple(stops)


class JsonSchemaFormat(Strict):
    name: str = Field("response", max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'"json_schema" goes with type "json_schema", not {self.type!r}')
        return self


class Sampling(Strict):
    """The fields both OpenAI routes share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="extension: > 1 discourages repeats")
    cache_prompt: bool = Field(True, description="extension (llama-server's): false reads the whole prompt "
                                                 "instead of reusing the KV cache of a prefix already read")
    response_format: ResponseFormat | None = None
    json_schema: dict | None = Field(None, description="extension (llama-server's): the output is JSON of this schema")
    grammar: str | None = Field(None, min_length=1, description="extension (llama-server's): a GBNF grammar")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N, description="choices per prompt (each its own sample; seeds seed + i)")
    user: str | None = Field(None, description="accepted and ignored")
    store: bool | None = Field(None, description="accepted and ignored (nothing is stored)")
    metadata: dict[str, str] | None = Field(None, description="accepted and ignored")
    service_tier: str | None = Field(None, description="accepted and ignored")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        _check_stop(v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_BIAS:
            raise ValueError(f"at most {MAX_BIAS} logit_bias entries, got {len(v)}")
        ids = set()
        for key, bias in v.items():
            if not re.fullmatch(r"[0-9]{1,10}", key):
                raise ValueError(f"logit_bias keys are token ids as strings (\"15043\"), got {key[:20]!r}")
            if int(key) in ids:
                raise ValueError(f"logit_bias names token {int(key)} twice")
            ids.add(int(key))
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are from -100 to 100, got {bias}")
        return v

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        given = [k for k in ("response_format", "json_schema", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ParamError(given[1], f"give one of response_format, json_schema and grammar, not {' and '.join(given)}")
        return self

    @property
    def grammar_spec(self) -> tuple[Grammar | None, str]:
        """The grammar the output keeps to (None: free text), and the field it came from."""
        field = "json_schema" if self.json_schema is not None else "grammar" if self.grammar is not None \
            else "response_format"
        try:
            if self.json_schema is not None:
                return Grammar.json_schema(self.json_schema), field
            if self.grammar is not None:
                return Grammar.gbnf(self.grammar), field
            rf = self.response_format
            if rf is None or rf.type == "text":
                return None, field
            if rf.type == "json_object":
                return Grammar.json_object(), field
            return Grammar.json_schema(rf.json_schema.schema_, strict=bool(rf.json_schema.strict)), field
        except UserError as e:
            raise ParamError(field, str(e)) from None

    @property
    def stops(self) -> tuple[str, ...]:
        return _check_stop(self.stop)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tools(self):
        if self.tool_choice is not None and not self.tools:
            raise ParamError("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools}:
            raise ParamError("tool_choice", f"no tool is named {self.tool_choice.function.name!r}")
        if self.tools and self.choice != "none" and self.grammar_spec[0] is not None:
            raise ParamError("tools", "give tools or a response format (response_format, json_schema, grammar), not both")
        return self

    @property
    def choice(self):
        """tool_choice as serve/tools.py takes it: "none", "auto", "required" or {"function": {"name": ...}}."""
        c = self.tool_choice or "auto"
        return c if isinstance(c, str) else c.model_dump()

    @model_validator(mode="after")
    def _together(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ParamError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs set to true")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists (one choice each)")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        n = 1 if isinstance(v, str) or isinstance(v[0], int) else len(v)
        if not 1 <= n <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, got {n}")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a token-id prompt is empty")
        return v

    @model_validator(mode="after")
    def _rows(self):
        if len(self.prompts) * (self.n or 1) > MAX_ROWS:
            raise ParamError("n", f"prompts x n may be at most {MAX_ROWS}, got {len(self.prompts)} x {self.n}")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: its text, or its token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give either prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


# ---- the Azure ML online endpoint (the Llama 2 model card's /score contract) -------------


class ScoreParameters(Strict):
    """Hugging Face generation parameters that map onto our sampler."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    return_full_text: bool | None = None

    @model_validator(mode="after")
    def _sampling(self):
        if self.do_sample and self.temperature == 0:
            raise ParamError("temperature", "must be > 0 when do_sample is true (do_sample false is greedy)")
        return self


class ScoreInput(Strict):
    input_string: list[str] | list[ChatMessage] = Field(min_length=1, max_length=MAX_SCORE_INPUTS)
    parameters: ScoreParameters = Field(default_factory=ScoreParameters)


class ScoreRequest(Strict):
    input_data: ScoreInput

    @property
    def is_chat(self) -> bool:
        return isinstance(self.input_data.input_string[0], ChatMessage)


# ---- validation ---------------------------------------------------------------------------

T = TypeVar("T", bound=BaseModel)


def parse(schema: type[T], body: object) -> T:
    """Validate a decoded JSON body; APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False)) from None


# the OpenAI Batch API's url -> the schema of its body
BATCH_URLS: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                          "/v1/completions": CompletionRequest}


def parse_batch_body(url: object, body: object) -> BaseModel:
    schema = BATCH_URLS.get(url) if isinstance(url, str) else None
    if schema is None:
        raise APIError(400, f"url must be one of {', '.join(BATCH_URLS)}, got {url!r}", param="url")
    request = parse(schema, body)
    if request.stream:
        raise bad_request("stream is not allowed in a batch", param="stream")
    return request
