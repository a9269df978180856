"""`llama2-onnx generate`: continue a prompt."""

from __future__ import annotations

import json
import sys

from .cli_common import add_model_arguments, add_sampling_arguments, open_generator, sampling_kwargs


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message (with the model's chat format)")
    add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--logprobs", action="store_true",
                   help="report each token's log-probability (log-softmax of the raw logits, before temperature and top-p)")
    p.add_argument("--echo", action="store_true",
                   help="print the prompt first; with --logprobs its tokens are scored too (the first gets 0.0, as in Meta's echo)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, finish_reason, timings "
                   "(with --logprobs: logprobs and token_texts; with --echo all three start with the prompt)")


def run(args) -> int:
    kw = sampling_kwargs(args)  # bad values fail before the model loads
    gen = open_generator(args)
    kw.update(logprobs=args.logprobs, prompt_logprobs=args.echo and args.logprobs)
    if args.chat:
        prompt_ids = gen.chat_ids([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = gen.encode_prompt(args.prompt)
    stream = gen.stream_ids(prompt_ids, **kw)
    if args.echo and not args.json:
        sys.stdout.write(gen.tokenizer.decode(prompt_ids))
    for piece in stream:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = stream.result
    ids = (prompt_ids if args.echo else []) + result.tokens
    logprobs = ((result.prompt_logprobs if args.echo else []) + result.logprobs) if args.logprobs else None
    if args.json:
        out = result.to_dict()
        out.pop("prompt_logprobs", None)
        if args.echo:
            out["text"], out["tokens"] = gen.tokenizer.decode(prompt_ids) + result.text, ids
        if args.logprobs:
            out["logprobs"], out["token_texts"] = logprobs, [gen.tokenizer.decode([i]) for i in ids]
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print()
    if args.logprobs:
        print_logprobs(gen.tokenizer, ids, logprobs)
    t = result.timings
    print(f"[{len(result.tokens)} tokens, {result.finish_reason}; first token {t.prompt_ms:.0f} ms, "
          f"{t.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


def print_logprobs(tokenizer, ids: list[int], logprobs: list[float]) -> None:
    """One line per token: id, logprob, the token decoded on its own."""
    print(f"{'id':>7}  {'logprob':>9}  token")
    for i, lp in zip(ids, logprobs):
        print(f"{i:>7}  {lp:>9.4f}  {tokenizer.decode([i])!r}")
