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
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, finish_reason, timings")


def run(args) -> int:
    kw = sampling_kwargs(args)  # bad values fail before the model loads
    gen = open_generator(args)
    if args.chat:
        stream = gen.stream_chat([{"role": "user", "content": args.prompt}], **kw)
    else:
        stream = gen.stream(args.prompt, **kw)
    for piece in stream:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = stream.result
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        t = result.timings
        print()
        print(f"[{len(result.tokens)} tokens, {result.finish_reason}; first token {t.prompt_ms:.0f} ms, "
              f"{t.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0
