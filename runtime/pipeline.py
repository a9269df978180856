"""The Hugging Face one-liner over an ONNX model folder, without torch or transformers.

    from llama2_onnx import pipeline
    pipe = pipeline("text-generation", model="out/llama-2-7b")        # no model: the default one
    pipe("Plants create energy through a process known as photosynthesis.", max_new_tokens=50)
    # [{"generated_text": "Plants create energy ... photosynthesis. <the continuation>"}]
    pipeline("text-classification", model="out/llama-2-sentiment")("I loved it.")   # runtime/classifier.py
    # [{"label": "POSITIVE", "score": 0.97}]

Outputs and arguments follow transformers' TextGenerationPipeline: a string gives a list of one
dict, a list of strings a list of such lists; a chat (a list of {"role", "content"} messages,
encoded with the folder's chat format) gives the messages plus the assistant's reply. Greedy
unless do_sample=True, which samples with transformers' GenerationConfig defaults (temperature
1.0, top_k 50, top_p 1.0) unless given; left out, do_sample and those values are the model folder's
generation_config.json's where it has one, as transformers reads it; max_new_tokens defaults to 256, max_length counts the
prompt; return_full_text=False gives the new text only. Tasks are a registry, PIPELINES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llama2_onnx.errors import UserError

from .classifier import UNSET, Classifier, TextClassificationPipeline
from .generator import Generator
from .request import sampling

DEFAULT_MAX_NEW_TOKENS = 256  # transformers' text-generation default


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], dict)


class TextGenerationPipeline:
    task = "text-generation"

    def __init__(self, generator: Generator):
        self.generator = generator
        self.tokenizer = generator.tokenizer

    @classmethod
    def from_dir(cls, model: str | Path | None = None, device: int | str | None = None, **model_kwargs) -> "TextGenerationPipeline":
        if model is None:  # `from llama2_onnx import pipeline` opens the default model; runtime never exports
            raise UserError('pipeline("text-generation") needs model=FOLDER here; llama2_onnx.pipeline opens the default model')
        return cls(Generator.from_dir(model, **_device_kwargs(device), **model_kwargs))

    def __call__(self, text_inputs, *, max_new_tokens: int | None = None, max_length: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, repetition_penalty: float | None = None, return_full_text: bool = True,
                 seed: int | None = None, response_format=None):
        single = isinstance(text_inputs, str) or _is_chat(text_inputs)
        inputs = [text_inputs] if single else list(text_inputs)
        if not inputs:
            return []
        prompts = [self._encode(x) for x in inputs]
        if max_new_tokens is not None:  # wins over max_length, as in transformers
            limits = [max_new_tokens] * len(prompts)
        elif max_length is not None:  # a total, prompt included
            limits = [max(max_length - len(p), 0) for p in prompts]
        else:
            limits = [DEFAULT_MAX_NEW_TOKENS] * len(prompts)
        if min(limits) < 0:
            raise UserError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
        # greedy without do_sample: transformers ignores temperature, top_p and top_k then too; left out,
        # do_sample and the sampling values are the folder's generation_config.json's (transformers' rule)
        params = sampling("hf", folder=self.generator.generation, do_sample=do_sample, temperature=temperature,
                          top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        results = self.generator.generate_ids(prompts, limits, params, seed=seed, response_format=response_format)
        outputs = [[{"generated_text": self._output(x, r.tokens, return_full_text)}] for x, r in zip(inputs, results)]
        return outputs[0] if single else outputs

    def _encode(self, x) -> list[int]:
        if _is_chat(x):  # a chat ending in an assistant message is continued (transformers' continue_final_message)
            return self.generator.chat_ids(list(x))
        if not isinstance(x, str):
            raise UserError(f"text-generation takes a string, a chat (list of messages) or a list of those, got {type(x).__name__}")
        ids = self.tokenizer.encode(x, bos=self.generator.model.config.add_bos, eos=False)
        if not ids:
            raise UserError("the prompt is empty; give some text to continue")
        return ids

    def _output(self, x, new_ids: list[int], full: bool):
        text = self.tokenizer.decode(new_ids)  # transformers decodes the new tokens alone, specials skipped
        if not full:
            return text
        if _is_chat(x):
            return [dict(m) for m in x] + [{"role": "assistant", "content": text}]
        return x + text


def _device_kwargs(device: int | str | None) -> dict:
    """transformers' device argument as our provider: None -> auto; -1 or "cpu"; N, "cuda" or "cuda:N"."""
    if device is None:
        return {}
    if device == -1 or device == "cpu":
        return {"provider": "cpu"}
    if isinstance(device, int) and device >= 0:
        return {"provider": "cuda", "device_id": device}
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        n = device.partition(":")[2]
        return {"provider": "cuda", "device_id": int(n) if n.isdigit() else 0}
    raise UserError(f"device must be None, -1, 'cpu', a GPU index, 'cuda' or 'cuda:N', got {device!r}")


def _text_classification(model: str | Path | None, *, device: int | str | None = None, top_k: Any = UNSET,
                         function_to_apply: str | None = None, **model_kwargs) -> TextClassificationPipeline:
    """pipeline("text-classification", model=FOLDER): an exported LlamaForSequenceClassification
    (runtime/classifier.py); top_k and function_to_apply as transformers' pipeline takes them."""
    if model is None:
        raise UserError('pipeline("text-classification") needs model=FOLDER: a LlamaForSequenceClassification '
                        "checkpoint exported with `llama2-onnx export` (the default model generates text)")
    return TextClassificationPipeline(Classifier.from_dir(model, **_device_kwargs(device), **model_kwargs),
                                      top_k=top_k, function_to_apply=function_to_apply)


# task -> factory(model, **kwargs)
PIPELINES: dict[str, Callable[..., Any]] = {
    "text-generation": TextGenerationPipeline.from_dir,
    "text-classification": _text_classification,
}


def pipeline(task: str | None = None, model: str | Path | None = None, **kwargs):
    """transformers.pipeline(task, model=...) for our model folders. task None means "text-generation";
    kwargs: device (as transformers'), or Generator.from_dir's (provider, threads, io_binding, ...)."""
    task = task or "text-generation"
    factory = PIPELINES.get(task)
    if factory is None:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(sorted(PIPELINES))}")
    return factory(model, **kwargs)
