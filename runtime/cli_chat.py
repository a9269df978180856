"""`llama2-onnx chat`: multi-turn chat, streamed. Reads one message per line when stdin is not a terminal."""

from __future__ import annotations

import sys

from llama2_onnx.errors import UserError

from .cli_common import add_model_arguments, add_sampling_arguments, open_generator, sampling_kwargs

HELP = "commands: /reset forgets the conversation, /exit quits"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt for the conversation")
    add_sampling_arguments(p, max_new_tokens=256)


def fit_history(gen, dialog: list[dict], reserve: int) -> tuple[list[dict], int]:
    """Drop the oldest (user, assistant) turns until the prompt plus `reserve` new tokens fits.

    The system message, if any, is kept. Returns the dialog and how many turns were dropped.
    """
    system = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    dropped = 0
    limit = gen.args.max_seq_len - reserve
    while len(gen.chat_ids(system + turns)) > limit and len(turns) > 1:
        turns = turns[2:]
        dropped += 1
    if len(gen.chat_ids(system + turns)) > limit:
        raise UserError(f"the message does not fit in the model's context of {gen.args.max_seq_len} tokens; "
                        "send a shorter message or lower --max-new-tokens")
    return system + turns, dropped


def run(args) -> int:
    kw = sampling_kwargs(args)  # bad values fail before the model loads
    gen = open_generator(args)
    # Bytes that are not UTF-8 become U+FFFD rather than ending the conversation: one stray byte
    # in a piped file or a Latin-1 terminal should cost that character, not the session.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": args.system}] if args.system else []
    dialog = list(base)
    if interactive:
        print(f"chatting with {gen.model.folder.name} ({gen.model.provider.name}); {HELP}", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print()
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            dialog = list(base)
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            dialog, dropped = fit_history(gen, dialog + [{"role": "user", "content": message}], args.max_new_tokens)
        except UserError as e:
            if not interactive:
                raise
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest turn(s) to stay within the context)", file=sys.stderr)
        stream = gen.stream_chat(dialog, **kw)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        dialog.append({"role": "assistant", "content": stream.result.text})
    return 0
