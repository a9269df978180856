"""What every API does to a request before the engine sees it, in one place: the sampling its
defaults fill in (one table, by API, under the model folder's generation_config.json) and its token
budget against the context (one rule).

    params = sampling("openai", temperature=req.temperature, top_p=req.top_p)   # -> SamplingParams
    params = sampling("chat", folder=gen.generation, temperature=None)            # the folder's defaults first
    n = token_budget(len(ids), asked=64, context=4096)                           # ContextError if it cannot fit

The engine's submit checks what reaches it once more (ids in the vocabulary, a budget that fits),
as the last guard; the APIs turn a ContextError into their own error (the CLI's one line, the
server's OpenAI `context_length_exceeded`).
"""

from __future__ import annotations

from llama2_onnx.errors import UserError

from .generation_config import HF_DEFAULTS, GenerationConfig
from .sampler import SamplingParams

# api -> what a request gets for each sampling field it leaves out (None or absent)
DEFAULTS: dict[str, dict[str, float | int]] = {
    "generator": dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0),  # our Python API and CLIs: greedy
    "openai": dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0),  # the OpenAI API's (completions)
    # chat answers (the server's chat route, its page): Meta's published Llama 2 chat values
    "chat": dict(temperature=0.6, top_p=0.9, top_k=0, repetition_penalty=1.0),
    "hf": dict(temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0),  # transformers' GenerationConfig (do_sample)
    "meta": dict(temperature=0.6, top_p=0.9, top_k=0, repetition_penalty=1.0),  # Meta's text/chat_completion
}
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0)  # do_sample false: the penalty still applies
HF_SAMPLED = {k: HF_DEFAULTS[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}


def folder_defaults(api: str, folder: GenerationConfig | None) -> dict[str, float | int]:
    """What a model folder's generation_config.json puts over an API's defaults. The OpenAI routes take
    its sampling values whatever its do_sample says (vLLM's rule); our API, the CLIs and Hugging Face's
    take transformers' rule: sampled (its values over transformers' defaults) only when do_sample is
    true, else greedy with its repetition penalty. Meta's API keeps Meta's signature defaults."""
    if folder is None or api == "meta":
        return {}
    if api in ("openai", "chat"):
        return folder.sampling
    if folder.do_sample:
        return {**HF_SAMPLED, **folder.sampling}
    return {k: v for k, v in folder.sampling.items() if k == "repetition_penalty"}


def sampling(api: str, *, greedy: bool = False, do_sample: bool | None = None, folder: GenerationConfig | None = None,
             **given: float | int | None) -> SamplingParams:
    """SamplingParams from the fields a request gives (None: the default: the folder's generation config,
    else the API's); greedy keeps only the repetition penalty (Hugging Face's do_sample=False).
    do_sample (Hugging Face's APIs): greedy unless true; None: the folder's do_sample, else greedy."""
    if do_sample is None and folder is not None and api == "hf":
        do_sample = folder.do_sample
    if do_sample is not None:
        greedy = not do_sample
    defaults = {**DEFAULTS[api], **folder_defaults(api, folder)}
    if unknown := set(given) - set(defaults):
        raise TypeError(f"unknown sampling fields {sorted(unknown)}")
    values = {k: defaults[k] if given.get(k) is None else given[k] for k in defaults}
    return SamplingParams(**(values | GREEDY if greedy else values))


class ContextError(UserError):
    """A prompt that fills the context, or an explicit ask that does not fit in what it leaves."""

    def __init__(self, prompt_tokens: int, context: int, asked: int | None = None):
        self.prompt_tokens, self.context, self.asked = prompt_tokens, context, asked
        if asked is None:
            message = f"the prompt is {prompt_tokens} tokens, the model's context is {context}; shorten the prompt"
        else:
            message = (f"the prompt is {prompt_tokens} tokens and {asked} more were asked for, past the model's "
                       f"context of {context}; shorten the prompt or ask for fewer")
        super().__init__(message)


def token_budget(prompt_tokens: int, asked: int | None, context: int, *, explicit: bool = False) -> int:
    """New tokens a prompt of prompt_tokens may have: asked (None: the rest of the context), capped at
    what the context leaves. ContextError when the prompt leaves no room for what is asked (a prompt
    only scored, asked 0, may fill the context), or when an explicit ask does not fit (explicit=False
    caps it instead, as Meta's and Hugging Face's generate do)."""
    room = context - prompt_tokens
    if room < 0 or (room == 0 and asked != 0):
        raise ContextError(prompt_tokens, context)
    if asked is None:
        return room
    if asked < 0:
        raise UserError(f"the number of new tokens must be at least 0, got {asked}")
    if explicit and asked > room:
        raise ContextError(prompt_tokens, context, asked)
    return min(asked, room)
