"""The Azure ML online-endpoint contract of the Llama 2 model card (POST /score).

    {"input_data": {"input_string": ["the meaning of life is", ...],
                    "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": true}}}
    -> [{"0": "the meaning of life is <its continuation>", "1": ...}]     one record, a key per prompt

    {"input_data": {"input_string": [{"role": "user", "content": "..."}], "parameters": {...}}}
    -> {"output": "<the assistant's answer>"}

Parameters are Hugging Face generate()'s, with the model folder's generation_config.json as
defaults where it has one (transformers' rule: runtime/request.py): do_sample false (the default
without one) is greedy; with do_sample true, temperature, top_p and top_k default to the file's
values, else Hugging Face's 1.0, 1.0 and 50.
return_full_text (default true) puts the prompt before the continuation, as the card's sample
output shows; max_new_tokens defaults to 128, clipped to the context left.
"""

from __future__ import annotations

from llama2_onnx.runtime.request import sampling

from .schemas import ScoreParameters, ScoreRequest
from .service import Service, check_finish

DEFAULT_MAX_NEW_TOKENS = 128


def _request(service: Service, ids: list[int], p: ScoreParameters, param: str):
    params = sampling("hf", folder=service.gen.generation, do_sample=p.do_sample, temperature=p.temperature,
                      top_p=p.top_p, top_k=p.top_k, repetition_penalty=p.repetition_penalty)
    asked = DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens
    n = service.budget(len(ids), asked, explicit=p.max_new_tokens is not None, param=param)
    return service.make_request(ids, n, params)


async def score(service: Service, req: ScoreRequest) -> list[dict] | dict:
    data, p = req.input_data, req.input_data.parameters
    if req.is_chat:
        param = "input_data.input_string"
        request = await service.off_loop(lambda: _request(service, service.chat_ids(data.input_string, param), p, param))
        (fin,) = await service.submit([request]).wait()
        check_finish(fin, service.timeout_s)
        return {"output": fin.text}
    prompts = list(data.input_string)
    params = [f"input_data.input_string[{i}]" for i in range(len(prompts))]
    requests = await service.off_loop(
        lambda: [_request(service, service.prompt_ids(text, param), p, param) for text, param in zip(prompts, params)])
    group = service.submit(requests)
    finished = await group.wait()
    full = p.return_full_text is not False
    record = {}
    for i, (prompt, fin) in enumerate(zip(prompts, finished)):
        check_finish(fin, service.timeout_s)
        text = service.lead_space(group.first_token(i), fin.text)
        record[str(i)] = prompt + text if full else text
    return [record]
