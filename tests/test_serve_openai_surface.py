"""Requests valid under the OpenAI API that clients send (LangChain's content parts, `developer`
messages, `name`, runs of one role, a final assistant message to continue, the no-op fields store,
metadata and service_tier): each is answered as its plain equivalent is, through the openai client."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_live import serving  # noqa: E402

MODEL = "tiny"
GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def client(tiny_onnx_ort):
    with serving(tiny_onnx_ort, max_batch=2, model_id=MODEL) as (url, service):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30), service


def answer(client, messages, **kw) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, **kw).choices[0].message.content


def test_equivalent_forms_answer_alike(client):
    c, _ = client
    plain = answer(c, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}])
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Tell me about foxes."}]}]
    assert answer(c, parts, store=False, metadata={"k": "v"}, service_tier="auto") == plain


def test_runs_of_one_role_and_a_continued_answer(client):
    c, service = client
    two = [{"role": "user", "content": "Tell me"}, {"role": "user", "content": "about foxes."}]
    assert answer(c, two) == service.gen.chat(two, max_new_tokens=8).text
    start = [{"role": "user", "content": "Tell me about foxes."}, {"role": "assistant", "content": "Foxes are"}]
    got = answer(c, start)
    assert got == service.gen.chat(start, max_new_tokens=8).text
    assert service.tokenizer.decode(service.gen.chat_ids(start)).endswith("[/INST] Foxes are")  # not closed


def test_still_refused(client):
    c, _ = client
    for messages in ([{"role": "tool", "content": "x"}], [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert "messages" in str(e.value)
