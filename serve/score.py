"""Batch scoring without a server (`llama2-onnx score INPUT OUTPUT [MODEL]`): the same Service,
engine and request validation as the HTTP routes, over two file layouts.

- OpenAI Batch: INPUT is JSONL, one {"custom_id", "method": "POST", "url", "body"} per line, url
  /v1/chat/completions or /v1/completions. OUTPUT is a JSONL file of
  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}: a request the
  API refuses gets its status and error body in `response`; a line that is not a request at all
  (not UTF-8, not JSON, nested too deeply to read, no body, method not POST) gets response null
  and `error` {"code", "message"} naming the line. The other lines are answered.
- Azure ML batch endpoint: INPUT is a CSV file or a folder of them, each with an `input_string`
  (or `text`) column: a prompt, or a JSON list of {"role", "content"} messages for a chat.
  OUTPUT is a folder; OUTPUT/predictions.csv gets `row_number_per_file, prediction,
  batch_input_file_name` rows, the prediction as /score answers (prompt + continuation, or the
  assistant's answer); a failed row's prediction (a cell that is not UTF-8 included) is its
  error body as JSON.

INPUT is a regular file (CSV if its name ends in .csv, else JSONL) or a folder of .csv files;
score only reads it. OUTPUT is written only when it is
- new: a JSONL file in a folder that exists (no missing folder is made), or a CSV OUTPUT folder
  whose parent exists (the folder itself is made); or
- score's own output for this INPUT: a regular file (OUTPUT/predictions.csv for CSV) in which
  every whole record is one score writes, for one of INPUT's items (JSONL: a JSON object with
  exactly the keys id, custom_id, response, error, its id one of INPUT's; CSV: the header, then
  rows of 3 fields whose (batch_input_file_name, row_number_per_file) is one of INPUT's rows),
  plus at most one torn record at the end that begins as one of ours does (JSONL:
  `{"id": "batch_req_`; CSV: a row number, then a comma).
Everything else is refused with one line, before any byte is cut or written: an OUTPUT that is
INPUT (also through a symbolic or hard link), a CSV OUTPUT that is the INPUT folder or whose
predictions.csv is an input file, an existing file that is not score's output for this INPUT
(left as it was, byte for byte), an OUTPUT that is not a regular file (for CSV: a folder), such
as a FIFO or /dev/full, and a path that cannot be read or written.

Restartable: killed at any moment (SIGKILL included) and run again with the same OUTPUT, it keeps
the finished items and answers only the rest. Each output record is appended with one write,
then flushed and fsynced, so the file holds whole records plus at most one torn record at its
end, which the next run cuts off. Records are keyed by the request's id (from custom_id) or by
(file, row), so none is answered twice.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from llama2_onnx.errors import UserError

from . import azure, openai_api
from .errors import APIError, bad_request
from .schemas import ChatCompletionRequest, ScoreParameters, ScoreRequest, parse, parse_batch_body
from .score_files import (CSV_LAYOUT, JSONL_LAYOUT, PREDICTIONS, RecordFile, csv_key, csv_output_folder,
                          not_an_input, read_input, stat_or_none)
from .service import Service

PROMPT_COLUMNS = ("input_string", "text")
BAD_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" decodes a non-UTF-8 byte to
RETRY_S = 0.05  # wait before resubmitting when the engine's queue is full


# ---- items -------------------------------------------------------------------------------------------


@dataclass
class Item:
    key: str  # the record's identity in OUTPUT
    answer: Callable[[Service], Awaitable[str]]  # -> the output record, newline-terminated


def _batch_id(custom_id: object, line: int) -> str:
    seed = f"custom_id:{custom_id}" if isinstance(custom_id, str) else f"line:{line}"
    # surrogatepass: a custom_id may hold a lone surrogate (a \udXXX escape) and still needs an id
    return "batch_req_" + hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _batch_line(raw: bytes, n: int) -> tuple[dict, str | None]:
    """Line n of the input -> (its object, {} when it has none; why it is not a request, if that is known)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return {}, f"line {n} is not UTF-8 (its byte {e.start + 1} is 0x{raw[e.start]:02x})"
    except RecursionError:  # json's parser recurses once per [ or {
        return {}, f"line {n} is nested too deeply to read"
    except ValueError as e:  # not JSON, or a number longer than int() reads (4300 digits)
        return {}, f"line {n} is not JSON ({e.msg if isinstance(e, json.JSONDecodeError) else 'a number is too long'})"
    if not isinstance(obj, dict):
        return {}, f"line {n} is not a JSON object"
    return obj, None


def batch_items(path: Path) -> list[Item]:
    """OpenAI Batch JSONL lines -> items; duplicate custom_ids refuse the whole file (as OpenAI does)."""
    items, seen = [], {}
    # split on bytes: one line that is not UTF-8 fails alone, and U+2028 inside a string ends no line
    for n, raw in enumerate(read_input(path).split(b"\n"), 1):
        if not raw.strip():
            continue
        obj, problem = _batch_line(raw, n)
        custom_id = obj.get("custom_id")
        if isinstance(custom_id, str):
            if custom_id in seen:
                raise UserError(f"{path}: custom_id {custom_id!r} is on lines {seen[custom_id]} and {n}; each must be unique")
            seen[custom_id] = n
        elif problem is None:
            problem = f"line {n} has no string custom_id"
        if problem is None and obj.get("method") != "POST":
            problem = f"line {n}: method must be POST, got {obj.get('method')!r}"
        if problem is None and not isinstance(obj.get("body"), dict):
            problem = f"line {n}: body must be a JSON object"
        rid = _batch_id(custom_id, n)
        items.append(Item(rid, _batch_answer(rid, custom_id if isinstance(custom_id, str) else None, obj, problem)))
    return items


def _batch_answer(rid: str, custom_id: str | None, obj: dict, problem: str | None):
    async def answer(service: Service) -> str:
        out = {"id": rid, "custom_id": custom_id, "response": None, "error": None}
        if problem is not None:
            out["error"] = {"code": "invalid_request", "message": problem}
        else:
            try:
                req = parse_batch_body(obj.get("url"), obj["body"])
                run = openai_api.chat_completion if isinstance(req, ChatCompletionRequest) else openai_api.completion
                body = await _retrying(lambda: run(service, req))
                out["response"] = {"status_code": 200, "request_id": rid, "body": body}
            except APIError as e:
                out["response"] = {"status_code": e.status, "request_id": rid, "body": e.body()}
        return json.dumps(out, ensure_ascii=False) + "\n"
    return answer


def csv_files(source: Path, st: os.stat_result) -> list[Path]:
    """INPUT's CSV files: itself, or the folder's .csv files (each a regular file with a UTF-8 name)."""
    if not stat.S_ISDIR(st.st_mode):
        return [source]
    try:
        files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".csv")
    except OSError as e:
        raise UserError(f"cannot read folder {source}: {e.strerror}") from None
    if not files:
        raise UserError(f"{source} has no .csv files")
    for f in files:
        found = stat_or_none(f, "read")
        if found is None or not stat.S_ISREG(found.st_mode):
            raise UserError(f"{f} is not a regular file; move it out of {source}")
        if BAD_BYTE.search(f.name):  # it could not be written into predictions.csv as itself
            raise UserError(f"the name of {ascii(str(f))} is not UTF-8; rename the file")
    return files


def csv_items(files: list[Path], parameters: dict) -> list[Item]:
    items = []
    for f in files:
        # surrogateescape: a byte that is not UTF-8 fails only its own row (BAD_BYTE finds it there)
        reader = csv.DictReader(io.StringIO(read_input(f).decode("utf-8-sig", "surrogateescape"), newline=""))
        try:
            column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
            if column is None:
                raise UserError(f"{f} has no {' or '.join(PROMPT_COLUMNS)} column (columns: {reader.fieldnames})")
            for row, record in enumerate(reader):
                items.append(Item(csv_key(f.name, row), _csv_answer(f.name, row, record[column] or "", parameters)))
        except csv.Error as e:  # e.g. a cell over the csv module's size limit
            raise UserError(f"{f}, line {reader.line_num}: {e}") from None
    return items


def _csv_input(cell: str) -> list:
    """A cell is a prompt, or a JSON list of chat messages."""
    if cell.lstrip().startswith("["):
        try:
            messages = json.loads(cell)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than json's parser recurses
            return [cell]
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            return messages
    return [cell]


def _csv_answer(name: str, row: int, cell: str, parameters: dict):
    async def answer(service: Service) -> str:
        try:
            if bad := BAD_BYTE.search(cell):
                byte = ord(bad.group()) - 0xDC00
                raise bad_request(f"input_string is not UTF-8 (byte 0x{byte:02x} at character {bad.start() + 1})",
                                  param="input_data.input_string")
            req = parse(ScoreRequest, {"input_data": {"input_string": _csv_input(cell), "parameters": parameters}})
            result = await _retrying(lambda: azure.score(service, req))
            prediction = result["output"] if isinstance(result, dict) else result[0]["0"]
        except APIError as e:
            prediction = json.dumps(e.body(), ensure_ascii=False)
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow([row, prediction, name])
        return line.getvalue()
    return answer


async def _retrying(make: Callable[[], Awaitable]):
    """Run make(); while the engine's queue is full, wait and submit again."""
    while True:
        try:
            return await make()
        except APIError as e:
            if e.code != "queue_full":
                raise
            await asyncio.sleep(RETRY_S)


# ---- the job -------------------------------------------------------------------------------------------


@dataclass
class Summary:
    total: int
    skipped: int  # already in OUTPUT from an earlier run
    answered: int

    def __str__(self) -> str:
        return f"{self.answered} answered, {self.skipped} already done, {self.total} in all"


def open_job(source: Path, output: Path, parameters: dict | None = None) -> tuple[list[Item], RecordFile, set[str]]:
    """The items, the output file (torn tail cut) and the keys it already holds. INPUT and OUTPUT are
    checked first (see the module docstring): an OUTPUT refused is left as it was."""
    st = stat_or_none(source, "read")
    if st is None:
        raise UserError(f"{source} does not exist")
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UserError(f"{source} is not a regular file or a folder")
    if stat.S_ISDIR(st.st_mode) or source.suffix.lower() == ".csv":
        params = parse_parameters(parameters or {})
        files = csv_files(source, st)
        items = csv_items(files, params)
        made = csv_output_folder(output, source, files)
        out = RecordFile(output / PREDICTIONS, CSV_LAYOUT, {it.key for it in items}, made_folder=made)
    else:
        found = stat_or_none(output, "use")
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise UserError(f"{output} is a folder; for an OpenAI Batch file give the output .jsonl file")
        items = batch_items(source)
        if found is not None:
            not_an_input(output, [source])
        out = RecordFile(output, JSONL_LAYOUT, {it.key for it in items})
    return items, out, out.done


def parse_parameters(parameters: dict) -> dict:
    try:
        return parse(ScoreParameters, parameters).model_dump(exclude_none=True)
    except APIError as e:
        raise UserError(f"--parameters: {e.message}") from None


async def run_job(service: Service, items: list[Item], out: RecordFile, done: set[str], *,
                  concurrency: int, progress: bool = False) -> Summary:
    todo = [it for it in items if it.key not in done]
    summary = Summary(total=len(items), skipped=len(items) - len(todo), answered=0)
    gate = asyncio.Semaphore(concurrency)

    def show() -> None:
        if progress:
            n = summary.skipped + summary.answered
            print(f"\rscore: {n}/{summary.total} ({100 * n // max(summary.total, 1)}%)", end="", file=sys.stderr, flush=True)

    async def one(item: Item) -> None:
        async with gate:
            record = await item.answer(service)
        out.append(record)
        summary.answered += 1
        show()

    show()
    await asyncio.gather(*(one(it) for it in todo))
    if progress:
        print(file=sys.stderr)
    return summary


def score(service: Service, job: tuple[list[Item], RecordFile, set[str]], *, concurrency: int | None = None,
          progress: bool = False) -> Summary:
    """Answer every item of job (open_job's answer) not yet in its output, and close the output; see
    the module docstring."""
    items, out, done = job
    try:
        limit = concurrency or 2 * service.engine.max_batch
        return asyncio.run(run_job(service, items, out, done, concurrency=limit, progress=progress))
    finally:
        out.close()
