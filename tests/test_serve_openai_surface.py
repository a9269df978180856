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
    with serving(tiny_onnx_ort, max_batch=4, model_id=MODEL) as (url, service):
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
    for messages in ([{"role": "function", "content": "x"}], [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert "messages" in str(e.value)


def test_n_choices_are_the_seeded_single_runs(client):
    c, _ = client
    msgs = [{"role": "user", "content": "Tell me about foxes."}]
    many = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    single = [c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, seed=11 + k)
              .choices[0].message.content for k in range(3)]
    assert [ch.message.content for ch in many.choices] == single
    assert len(set(single)) > 1
    one = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, seed=11)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    streamed: dict[int, str] = {}
    for chunk in c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, seed=11, n=3,
                                           stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[k] for k in range(3)] == single
    comp = c.completions.create(model=MODEL, prompt=["The fox", "The dog"], max_tokens=6, temperature=1.0, seed=5, n=2)
    assert [ch.index for ch in comp.choices] == [0, 1, 2, 3]
    assert comp.choices[2].text == c.completions.create(model=MODEL, prompt="The dog", max_tokens=6, temperature=1.0,
                                                        seed=5).choices[0].text


def test_n_above_the_rows_is_a_400(client):
    c, _ = client
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=5)
    assert e.value.body["param"] == "n" and "--max-batch" in e.value.body["message"]


def test_token_id_prompts(client):
    c, service = client
    ids = service.gen.encode_prompt("The quick brown fox")
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, echo=True)
    by_text = c.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = c.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert len(both.choices) == 2 and both.usage.prompt_tokens == len(ids) + 3


def test_logit_bias_and_penalties(client):
    c, service = client
    msgs = [{"role": "user", "content": "Tell me about foxes."}]
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True)
    first = service.tokenizer.encode(plain.choices[0].logprobs.content[0].token, bos=False, eos=False)
    forced = service.tokenizer.encode("zebra", bos=False, eos=False)[-1]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                  logit_bias={str(forced): 100})
    assert [t.token for t in r.choices[0].logprobs.content] == [service.texts.text(forced)] * 3
    banned = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                       logit_bias={str(t): -100 for t in first}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != plain.choices[0].logprobs.content[0].token
    for bad in ({"²": 1}, {"01": 1, "1": 2}, {"-1": 1}, {"12345678901": 1}):  # not ids; one id twice
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, logit_bias=bad)
        assert e.value.body["param"] == "logit_bias"
    # OpenAI's penalties, checked against the raw logprobs: each greedy token is the best of the top 20
    # once every earlier generated token's presence and frequency penalties are taken off
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=20, presence_penalty=0.7, frequency_penalty=1.3)
    counts: dict[str, int] = {}
    for step in r.choices[0].logprobs.content:
        adjusted = {t.token: t.logprob - (0.7 + 1.3 * counts[t.token] if t.token in counts else 0.0)
                    for t in step.top_logprobs}
        assert max(adjusted, key=adjusted.get) == step.token
        counts[step.token] = counts.get(step.token, 0) + 1
