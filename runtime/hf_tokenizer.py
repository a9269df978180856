"""transformers' tokenizer calling conventions over a model folder's tokenizer, without torch
(runtime/hf_auto.py's AutoTokenizer), and the array conversions the Auto classes share: numpy in and
out, torch tensors only where the caller's are torch (or return_tensors="pt" asks for them).

    tokenizer = FolderTokenizer(folder)            # AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["Hi", "The sky is"], return_tensors="np", padding=True)
    tokenizer.batch_decode(ids, skip_special_tokens=True)

Padding uses the folder's pad id (Llama 2 has none: EOS), on the left unless from_pretrained is given
padding_side="right"; decode renders special tokens as transformers' Llama tokenizer
does ("<s> Hello").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llama2_onnx.errors import UserError

# ---- arrays: numpy in and out, torch only when the caller's are torch ----------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def to_numpy(x: Any, name: str) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be token ids (a list, numpy array or torch tensor)") from None
    if a.dtype.kind not in "iub" or a.ndim not in (1, 2) or a.size == 0:
        raise UserError(f"{name} must be a non-empty 1-D or 2-D array of integer token ids, got shape {a.shape} of {a.dtype}")
    return (a[None] if a.ndim == 1 else a).astype(np.int64)


def as_type_of(like: Any, a: np.ndarray):
    """a in the caller's array type: a torch tensor where like is one, else numpy."""
    if _is_torch(like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)
    return a


def _tensors(rows: list[list[int]], kind: str | None):
    if kind is None:
        return rows
    a = np.array(rows, np.int64)
    if kind == "np":
        return a
    if kind == "pt":
        try:
            import torch
        except ImportError:
            raise UserError('return_tensors="pt" needs torch installed; use return_tensors="np" without it') from None
        return torch.from_numpy(a)
    raise UserError(f'return_tensors must be "np" or "pt" (or None for lists), got {kind!r}')


class BatchEncoding(dict):
    """transformers' BatchEncoding: a dict (input_ids, attention_mask) whose keys read as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """transformers' .to(model.device): torch tensors move; numpy arrays and lists stay as they are."""
        return BatchEncoding({k: v.to(device) if _is_torch(v) else v for k, v in self.items()})


# ---- the tokenizer ---------------------------------------------------------------------------------


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str | Path, *args, padding_side: str | None = None, **ignored) -> "FolderTokenizer":
        return FolderTokenizer(Path(path), padding_side)


class FolderTokenizer:
    """The model folder's tokenizer with transformers' calling conventions."""

    def __init__(self, folder: Path, padding_side: str | None = None):
        from .folder import FolderConfig
        from .tokenizer import load_tokenizer

        self.name_or_path = str(folder)
        self.config = FolderConfig.read(folder)
        a = self.config.model
        if not self.config.tokenizer:
            raise UserError(f"{folder} has no tokenizer; export it again with --tokenizer PATH")
        self.tok = load_tokenizer(folder, bos_id=a.bos_id, eos_id=a.eos_id)
        self.padding_side = padding_side or "left"  # what generation wants (our exports name no side)
        if self.padding_side not in ("left", "right"):
            raise UserError(f'padding_side must be "left" or "right", got {self.padding_side!r}')
        self.bos_token_id, self.eos_token_id, self.pad_token_id = a.bos_id, a.eos_id, a.fill_id
        self.model_max_length = a.max_seq_len
        self.chat_format = self.config.chat_format
        self.add_bos = self.config.add_bos

    # names as tokens
    @property
    def bos_token(self) -> str:
        return self.tok.id_to_piece(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self.tok.id_to_piece(self.eos_token_id)

    @property
    def pad_token(self) -> str:
        return self.tok.id_to_piece(self.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def __len__(self) -> int:
        return self.tok.vocab_size

    def convert_ids_to_tokens(self, ids):
        return self.tok.id_to_piece(ids) if isinstance(ids, (int, np.integer)) else [self.tok.id_to_piece(i) for i in ids]

    # text -> ids
    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **kw):
        ids = self(text, add_special_tokens=add_special_tokens, **kw)["input_ids"]
        return ids if return_tensors is None else _tensors([ids], return_tensors)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str = False, max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool = True, **ignored) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("the tokenizer takes a string or a list of strings")
        rows = [self.tok.encode(t, bos=add_special_tokens and self.add_bos, eos=False) for t in texts]
        if truncation and truncation != "do_not_truncate":
            limit = max_length or self.model_max_length
            rows = [r[:limit] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length"):
            width = max(map(len, rows))
            if padding == "max_length":
                if not max_length:
                    raise UserError('padding="max_length" needs max_length')
                width = max(width, max_length)
            rows = [self._pad(r, width, self.pad_token_id) for r in rows]
            masks = [self._pad(m, width, 0) for m in masks]
        elif padding not in (False, None, "do_not_pad"):
            raise UserError(f'padding must be True, False, "longest" or "max_length", got {padding!r}')
        if return_tensors is not None and len(set(map(len, rows))) > 1:
            raise UserError("these texts have different lengths: pass padding=True to make one array of them")
        if single and return_tensors is None:
            out = {"input_ids": rows[0], "attention_mask": masks[0]}
        else:
            out = {"input_ids": _tensors(rows, return_tensors), "attention_mask": _tensors(masks, return_tensors)}
        if not return_attention_mask:
            out.pop("attention_mask")
        return BatchEncoding(out)

    def _pad(self, row: list[int], width: int, value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if self.padding_side == "left" else row + fill

    # ids -> text
    def decode(self, ids, skip_special_tokens: bool = False, **ignored) -> str:
        row = to_numpy(ids, "ids")
        if row.shape[0] != 1:
            raise UserError("decode takes one sequence of ids; use batch_decode for several")
        row = [int(t) for t in row[0]]
        special = self._special_ids()
        out, run = [], []
        for t in row:
            if t in special:
                out.append(self._text(run, after=any(out)))
                run = []
                if not skip_special_tokens:
                    out.append(self.tok.id_to_piece(t))
            else:
                run.append(t)
        out.append(self._text(run, after=any(out)))
        return "".join(out)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kw) -> list[str]:
        rows = to_numpy(sequences, "sequences") if not isinstance(sequences, list) or sequences and \
            not isinstance(sequences[0], list) else sequences
        return [self.decode(list(r), skip_special_tokens=skip_special_tokens, **kw) for r in rows]

    def _special_ids(self) -> set[int]:
        a = self.config.model
        ids = {a.bos_id, *a.eos_ids, a.fill_id}
        return {i for i in ids if i is not None and i >= 0}

    def _text(self, run: list[int], after: bool) -> str:
        """A run of ordinary tokens; after a special token SentencePiece's word-start space is kept, as
        transformers' Llama tokenizer keeps it ("<s> Hello")."""
        if not run:
            return ""
        text = self.tok.decode(run)
        if after and self.tok.id_to_piece(run[0]).startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    # chat
    def apply_chat_template(self, conversation: list[dict], tokenize: bool = True, add_generation_prompt: bool = True,
                            return_tensors: str | None = None, return_dict: bool = False, **ignored):
        """The folder's chat format (runtime/chat_format.py) applied to the messages; the prompt always
        ends ready for the assistant's answer (or continues a final assistant message)."""
        from .chat_format import format_dialog

        if not self.chat_format:
            raise UserError("this model folder names no chat format; export it again with --chat-format llama2 or chatml")
        ids = format_dialog(list(conversation), self.tok, self.chat_format)
        if not tokenize:
            return self.decode(ids)
        if return_dict:
            return BatchEncoding({"input_ids": _tensors([ids], return_tensors) if return_tensors else ids,
                                  "attention_mask": _tensors([[1] * len(ids)], return_tensors) if return_tensors
                                  else [1] * len(ids)})
        return _tensors([ids], return_tensors) if return_tensors else ids
