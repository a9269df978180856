"""Meta's interface (llama/generation.py of facebookresearch/llama) over an ONNX model folder.

    from llama2_onnx.runtime import Llama
    generator = Llama.build("out/llama-2-7b-chat", max_seq_len=512, max_batch_size=8)
    generator.text_completion(["I believe the meaning of life is"], max_gen_len=64)
    generator.chat_completion([[{"role": "user", "content": "what is the recipe of mayonnaise?"}]])

Meta's rules, kept exactly:
- temperature 0 is greedy; otherwise softmax(logits / temperature) then Meta's sample_top_p.
- max_gen_len defaults to max_seq_len - 1; row i gets at most min(max_gen_len, max_seq_len - len(prompt i))
  tokens (Meta's total_len cap, then its cut to len(prompt) + max_gen_len).
- Each row stops at its first EOS, which is cut off with everything after it.
- logprobs: the log-softmax of the raw logits (before temperature and top-p) of each token;
  "tokens" decodes each id on its own.
- echo=True: the prompt's tokens come first, scored by the logits before them; the first (BOS) gets
  0.0, the value Meta's zero-initialised token_logprobs keep at position 0. "generation" is then the
  whole sequence decoded, prompt included.
- A dialog whose messages contain [INST], [/INST], <<SYS>> or <</SYS>> (or the folder's own chat tags,
  <|im_start|>/<|im_end|> for ChatML) is answered with UNSAFE_ERROR
  while the rest of the batch is answered (Meta still generates for it; we skip it: tokens and logprobs []).

Where Meta asserts (more prompts than max_batch_size, a prompt longer than max_seq_len, bad roles),
we raise a one-line UserError. Meta's seed (build's seed=1) seeds one random stream per Llama.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, TypedDict

import numpy as np

from llama2_onnx.errors import UserError

from .chat_format import IM_END, IM_START, SPECIAL_TAGS, Dialog, Message
from .generator import Generator
from .request import sampling, token_budget
from .sampler import MAX_SEED

UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
FORMAT_TAGS = {"chatml": (IM_START, IM_END)}  # besides Meta's SPECIAL_TAGS, refused in any folder


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


class Llama:
    @staticmethod
    def build(model_dir: str | Path, max_seq_len: int | None = None, max_batch_size: int = 8,
              seed: int = 1, **model_kwargs) -> "Llama":
        """Open a model folder the way Meta's Llama.build opens a checkpoint (the default model's folder:
        llama2_onnx.assets.default_model_dir()).

        max_seq_len: the context for prompt and answer together (default, and at most: the folder's);
        max_batch_size: the most prompts or dialogs one call takes; model_kwargs go to Model.from_dir
        (provider, threads, io_binding, ...)."""
        # its batches in one go, each row max_seq_len tokens (on a GPU a row is allocated whole)
        generator = Generator.from_dir(model_dir, max_batch=max_batch_size, context=max_seq_len, **model_kwargs)
        ctx = generator.args.max_seq_len
        max_seq_len = ctx if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= ctx:
            raise UserError(f"max_seq_len must be from 1 to the model's context of {ctx}, got {max_seq_len}")
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
        return Llama(generator, max_seq_len, max_batch_size, seed)

    def __init__(self, generator: Generator, max_seq_len: int, max_batch_size: int, seed: int = 1):
        self.generator, self.tokenizer = generator, generator.tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.rng = np.random.default_rng(seed)  # Meta: torch.manual_seed(seed) once, at build

    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False,
                 response_format=None) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Meta's generate(): the tokens of each row (the prompt first with echo) cut at the first EOS,
        and their logprobs when asked for. response_format (not Meta's): the output keeps to a grammar
        (Generator.generate's)."""
        if len(prompt_tokens) > self.max_batch_size:
            raise UserError(f"{len(prompt_tokens)} prompts, but this Llama was built with max_batch_size="
                            f"{self.max_batch_size}; build it with a larger one or send fewer")
        if max_gen_len < 0:
            raise UserError(f"max_gen_len must be at least 0, got {max_gen_len}")
        for p in prompt_tokens:
            if len(p) > self.max_seq_len:
                raise UserError(f"a prompt is {len(p)} tokens, longer than max_seq_len={self.max_seq_len}; "
                                "shorten it or build with a larger max_seq_len")
        if not prompt_tokens:
            return [], ([] if logprobs else None)
        params = sampling("meta", greedy=temperature == 0, temperature=temperature, top_p=top_p)
        # Meta's rule: a prompt as long as max_seq_len generates nothing (no error), else the one budget rule
        limits = [token_budget(len(p), max_gen_len, self.max_seq_len) if len(p) < self.max_seq_len else 0
                  for p in prompt_tokens]
        results = self.generator.generate_ids(prompt_tokens, limits, params, seed=int(self.rng.integers(MAX_SEED)),
                                              logprobs=logprobs, prompt_logprobs=logprobs and echo,
                                              response_format=response_format)
        eos = self.tokenizer.eos_id
        out_tokens, out_logprobs = [], []
        for p, r in zip(prompt_tokens, results):
            toks = (list(p) if echo else []) + r.tokens  # r.tokens already end before the first EOS
            probs = ((r.prompt_logprobs if echo else []) + r.logprobs) if logprobs else None
            if eos in toks:  # Meta's cut, for an EOS inside an echoed prompt
                toks = toks[: toks.index(eos)]
                probs = probs[: len(toks)] if logprobs else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        echo: bool = False, response_format=None) -> list[CompletionPrediction]:
        """Continue each prompt: [{"generation": str}], plus "tokens" and "logprobs" with logprobs=True."""
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        bos = self.generator.model.config.add_bos
        prompt_tokens = [self.tokenizer.encode(x, bos=bos, eos=False) for x in prompts]
        tokens, probs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, response_format)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(tokens, probs)]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        response_format=None) -> list[ChatPrediction]:
        """Answer each dialog: [{"generation": {"role": "assistant", "content": str}}], plus "tokens" and
        "logprobs" with logprobs=True. The folder's chat format encodes (llama2: Meta's, token for token)."""
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if len(dialogs) > self.max_batch_size:
            raise UserError(f"{len(dialogs)} dialogs, but this Llama was built with max_batch_size="
                            f"{self.max_batch_size}; build it with a larger one or send fewer")
        tags = (*SPECIAL_TAGS, *FORMAT_TAGS.get(self.generator.chat_style, ()))
        unsafe = [any(isinstance(m, dict) and isinstance(m.get("content"), str) and tag in m["content"]
                      for tag in tags for m in dialog) for dialog in dialogs]
        prompt_tokens = [self.generator.chat_ids(d) for d, bad in zip(dialogs, unsafe) if not bad]
        tokens, probs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                      response_format=response_format)
        answers = iter(zip(tokens, probs or [None] * len(tokens)))
        out: list[ChatPrediction] = []
        for bad in unsafe:
            t, lp = ([], []) if bad else next(answers)
            content = UNSAFE_ERROR if bad else self.tokenizer.decode(t)
            pred: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                pred["tokens"], pred["logprobs"] = [self.tokenizer.decode([x]) for x in t], lp
            out.append(pred)
        return out
