"""Constrained decoding (runtime/grammar.py, llguidance) in the engine and the Python API: outputs
keep to JSON Schemas (checked by jsonschema), JSON, regexes and GBNF, greedy and sampled, on both
tokenizer kinds (SmolLM2's tokenizer.json, Llama 2's SentencePiece), with constrained and free rows
side by side in one batch."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.runtime import Generator, SamplingParams  # noqa: E402
from llama2_onnx.runtime.engine import FinishEvent, GenRequest, TokenEvent  # noqa: E402
from llama2_onnx.runtime.grammar import Grammar, GrammarError, grammar_of  # noqa: E402

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}}
ASK = [{"role": "user", "content": "Give me facts about Paris as JSON."}]


@pytest.fixture(scope="module")
def smol():
    from llama2_onnx.assets import default_model_dir

    g = Generator.from_dir(default_model_dir(), provider="cpu")
    yield g
    g.close()


@pytest.fixture(scope="module")
def tiny_spm(tiny_onnx_ort):
    g = Generator.from_dir(tiny_onnx_ort, provider="cpu")  # Llama 2's SentencePiece tokenizer, random weights
    yield g
    g.close()


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 1), (1.2, 2)])
def test_json_schema_output_validates(smol, temperature, seed):
    fmt = {"type": "json_schema", "json_schema": {"schema": CITY}}
    r = smol.chat(ASK, max_new_tokens=120, temperature=temperature, seed=seed, response_format=fmt)
    assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(r.text), CITY)


def test_json_object_and_free_text_differ(smol):
    free = smol.chat(ASK, max_new_tokens=40)
    assert not free.text.lstrip().startswith("{")  # the model answers in prose unconstrained
    r = smol.chat(ASK, max_new_tokens=200, response_format=Grammar.json_schema({"type": "object", "maxProperties": 3,
                                                                                 "additionalProperties": {"type": "string", "maxLength": 30}}))
    assert isinstance(json.loads(r.text), dict)


def test_regex_and_gbnf_on_sentencepiece(tiny_spm):
    """Random weights want anything: the grammar alone makes the text (SentencePiece's leading space allowed)."""
    r = tiny_spm.generate("Is the sky blue?", max_new_tokens=20, response_format=Grammar.regex(r"(yes|no), [a-z]{1,8}\."))
    assert r.finish_reason == "stop"
    assert __import__("re").fullmatch(r" ?(yes|no), [a-z]{1,8}\.", r.text), r.text
    gbnf = 'root ::= "red" | "green" | "blue"'
    r = tiny_spm.generate("Colour:", max_new_tokens=10, temperature=1.0, seed=3, response_format=Grammar.gbnf(gbnf))
    assert r.text.strip() in ("red", "green", "blue") and r.finish_reason == "stop"


def test_constrained_and_free_rows_in_one_batch(smol):
    """A constrained row beside free ones: the free rows' tokens equal their lone runs (the mask is per row)."""
    ids = smol.chat_ids(ASK)
    alone = smol.generate_ids([ids], 24, SamplingParams())[0]
    events: dict[int, list] = {0: [], 1: [], 2: []}
    done = threading.Event()

    def on(i):
        def f(e):
            events[i].append(e)
            if all(any(isinstance(x, FinishEvent) for x in v) for v in events.values()):
                done.set()
        return f
    eng = smol.engine
    eng.start()
    eng.submit(GenRequest(tuple(ids), 24, SamplingParams()), on(0))
    eng.submit(GenRequest(tuple(ids), 120, SamplingParams(), grammar=Grammar.json_schema(CITY)), on(1))
    eng.submit(GenRequest(tuple(ids), 24, SamplingParams()), on(2))
    assert done.wait(120)
    for i in (0, 2):
        assert [e.token for e in events[i] if isinstance(e, TokenEvent)] == alone.tokens
    jsonschema.validate(json.loads(events[1][-1].text), CITY)


def test_bad_grammars_are_one_line(smol):
    for fmt in ({"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}},
                Grammar.regex("(unclosed"), Grammar.gbnf("root ::= missing"), {"type": "xml"},
                {"type": "json_schema", "json_schema": {}}):
        with pytest.raises(UserError) as e:
            smol.chat(ASK, max_new_tokens=4, response_format=fmt)
        assert "\n" not in str(e.value) and str(e.value)
    with pytest.raises(GrammarError):
        Grammar.json_schema("{not json")


def test_grammar_of():
    assert grammar_of(None) is None and grammar_of({"type": "text"}) is None
    assert grammar_of({"type": "json_object"}) == Grammar.json_object()
    assert grammar_of({"type": "json_schema", "json_schema": {"schema": CITY}}) == Grammar.json_schema(CITY)


SCHEMAS = {
    "nested object": {"type": "object", "additionalProperties": False, "required": ["person"],
                      "properties": {"person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                                                "properties": {"name": {"type": "string", "maxLength": 12},
                                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}}}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["tags"],
              "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                      "items": {"type": "string", "maxLength": 8}}}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["colour"],
             "properties": {"colour": {"enum": ["red", "green", "blue"]}}},
    "bounded numbers": {"type": "object", "additionalProperties": False, "required": ["x", "p"],
                        "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                       "p": {"type": "number", "minimum": 0, "maximum": 1}}},
    "optional fields": {"type": "object", "additionalProperties": False, "required": ["id"],
                        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                       "note": {"type": "string", "maxLength": 10}}},
    "anyOf": {"type": "object", "additionalProperties": False, "required": ["value"],
              "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                 {"type": "string", "maxLength": 6}, {"type": "boolean"}]}}},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_twenty_samples_at_temperature_one_validate(smol, name):
    """The conformance check: 20 answers sampled at temperature 1 (rows of one batch, seeds 100 + i)."""
    schema = SCHEMAS[name]
    ids = smol.chat_ids([{"role": "user", "content": f"Reply with JSON for: {name}."}])
    results = smol.generate_ids([ids] * 20, 160, SamplingParams(temperature=1.0), seed=100,
                                response_format=Grammar.json_schema(schema))
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)
