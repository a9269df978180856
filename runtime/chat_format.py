"""Chat formats: a dialog of messages -> the prompt's token ids, as a registry by name.

    ids = format_dialog([{"role": "user", "content": "Hi!"}], tokenizer, "llama2")

- ``llama2``: Meta's ``chat_completion`` encoding (llama/generation.py), token for token.
- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then the generation
  prompt ``<|im_start|>assistant\\n`` (SmolLM2's chat template, default system prompt included).

A dialog may end with an assistant message: the answer continues it (it is not closed). Llama 2's
format alternates user and assistant turns, so runs of one role are merged (blank-line joined);
ChatML tags each message and takes any order.

Special tokens are always ids (BOS/EOS, <|im_start|>), never text run through the tokenizer;
messages that contain a format's tag text are refused, so a user cannot forge a turn. Any other
special token's spelling in a message (<|endoftext|>, <filename>, ...) is encoded as the plain
text it is (``parse_special=False``), never as the token: messages quoting them stay usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypedDict

from llama2_onnx.errors import UserError

from .tokenizer import Tokenizer


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


Dialog = list[Message]

ROLES = ("system", "user", "assistant")


class DialogError(UserError, ValueError):
    """A dialog that no chat format can encode: bad roles or order, or forbidden tag text."""


class ChatFormat(Protocol):
    name: str
    stop_texts: tuple[str, ...]  # special tokens, besides EOS, that end the assistant's turn

    def encode(self, dialog: Dialog, tokenizer: Tokenizer) -> list[int]: ...

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]: ...


# ---- shared validation ------------------------------------------------------------------


def _checked(dialog: Dialog, forbidden: tuple[str, ...]) -> list[Message]:
    """Well-formed messages, no forbidden text; returns a plain-dict copy."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise DialogError("the dialog is empty: give at least one user message")
    out: list[Message] = []
    for n, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DialogError(f"message {n} must be a dict with string 'role' and 'content', got {msg!r}")
        if msg["role"] not in ROLES:
            raise DialogError(f"message {n} has role {msg['role']!r}; roles are {', '.join(ROLES)}")
        for tag in forbidden:
            if tag in msg["content"]:
                raise DialogError(f"message {n} contains {tag!r}: special tags are not allowed in messages")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _merged(msgs: list[Message]) -> list[Message]:
    """Runs of messages from one role as one message (their texts joined by a blank line), as the
    OpenAI API allows them (two system messages, two user messages in a row)."""
    out: list[Message] = []
    for msg in msgs:
        if out and out[-1]["role"] == msg["role"]:
            out[-1] = {"role": msg["role"], "content": out[-1]["content"] + "\n\n" + msg["content"]}
        else:
            out.append(dict(msg))
    return out


def _check_turns(turns: list[Message]) -> None:
    """user, assistant, user, ... ending with user, or with an assistant message to continue (after an
    optional system message is taken off)."""
    if not turns:
        raise DialogError("the dialog has no user message after the system message")
    for n, msg in enumerate(turns):
        want = "user" if n % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise DialogError(f"turn {n} is from {msg['role']!r} but should be from {want!r}: after an optional "
                              "leading system message, roles must alternate user/assistant/user/...")


# ---- Llama 2 -----------------------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


@dataclass(frozen=True)
class Llama2Format:
    name: str = "llama2"
    stop_texts: tuple[str, ...] = ()

    def encode(self, dialog: Dialog, tokenizer: Tokenizer) -> list[int]:
        msgs = _merged(_checked(dialog, SPECIAL_TAGS))
        if msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise DialogError("the dialog has no user message after the system message")
            # Meta merges the system prompt into the first user turn.
            first = {"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}
            msgs = [first] + msgs[2:]
        _check_turns(msgs)
        prefill = msgs.pop()["content"].strip() if msgs[-1]["role"] == "assistant" else None  # continued, not closed
        ids: list[int] = []
        for user, answer in zip(msgs[::2], msgs[1::2]):  # finished turns, each with BOS and EOS
            text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            ids += tokenizer.encode(text, bos=True, eos=True, parse_special=False)
        last = f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}" + (f" {prefill}" if prefill else "")
        ids += tokenizer.encode(last, bos=True, eos=False, parse_special=False)
        return ids

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        return [tokenizer.eos_id]


# ---- ChatML (SmolLM2) ---------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class ChatMLFormat:
    name: str = "chatml"
    default_system: str | None = SMOLLM2_SYSTEM  # used when the dialog has none; None: add no system turn
    stop_texts: tuple[str, ...] = (IM_END,)

    def _special(self, tokenizer: Tokenizer, text: str) -> int:
        i = tokenizer.special_id(text)
        if i is None:
            raise DialogError(f"the tokenizer has no {text} token, so it cannot use the {self.name} chat format")
        return i

    def encode(self, dialog: Dialog, tokenizer: Tokenizer) -> list[int]:
        msgs = _checked(dialog, (IM_START, IM_END))  # ChatML tags every message: any order of roles
        if msgs[0]["role"] != "system" and self.default_system is not None:
            msgs = [{"role": "system", "content": self.default_system}] + msgs
        if all(m["role"] == "system" for m in msgs):
            raise DialogError("the dialog has no user message after the system message")
        prefill = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" else None  # continued, not closed
        start, end = self._special(tokenizer, IM_START), self._special(tokenizer, IM_END)
        newline = tokenizer.encode("\n", bos=False, eos=False)
        ids: list[int] = []
        for msg in msgs:  # <|im_start|>{role}\n{content}<|im_end|>\n
            text = f"{msg['role']}\n{msg['content']}"
            ids += [start] + tokenizer.encode(text, bos=False, eos=False, parse_special=False) + [end] + newline
        # the generation prompt, and the start of the answer when the dialog ends with one to continue
        ids += [start] + tokenizer.encode("assistant\n" + (prefill or ""), bos=False, eos=False, parse_special=False)
        return ids

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        ids = [self._special(tokenizer, t) for t in self.stop_texts]
        return ids + [tokenizer.eos_id] if tokenizer.eos_id not in ids else ids


CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (Llama2Format(), ChatMLFormat())}


def format_dialog(dialog: Dialog, tokenizer: Tokenizer, style: str) -> list[int]:
    """The prompt ids for answering the dialog's last user message in the named chat format."""
    fmt = CHAT_FORMATS.get(style)
    if fmt is None:
        raise DialogError(f"unknown chat format {style!r}; known formats: {', '.join(sorted(CHAT_FORMATS))}")
    return fmt.encode(dialog, tokenizer)
