"""Batch scoring without a server (`llama2-onnx score INPUT OUTPUT [MODEL]`): the same Service,
engine and request validation as the HTTP routes, over two file layouts.

- OpenAI Batch: INPUT is JSONL, one {"custom_id", "method": "POST", "url", "body"} per line, url
  /v1/chat/completions or /v1/completions. OUTPUT is a JSONL file of
  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}: a request the
  API refuses gets its status and error body in `response`; a line that is not a request at all
  (bad JSON, no body, method not POST) gets response null and `error` {"code", "message"}.
- Azure ML batch endpoint: INPUT is a CSV file or a folder of them, each with an `input_string`
  (or `text`) column: a prompt, or a JSON list of {"role", "content"} messages for a chat.
  OUTPUT is a folder; OUTPUT/predictions.csv gets `row_number_per_file, prediction,
  batch_input_file_name` rows, the prediction as /score answers (prompt + continuation, or the
  assistant's answer); a failed row's prediction is its error body as JSON.

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from llama2_onnx.errors import UserError

from . import azure, openai_api
from .errors import APIError
from .schemas import ChatCompletionRequest, ScoreParameters, ScoreRequest, parse, parse_batch_body
from .service import Service

PREDICTIONS = "predictions.csv"
CSV_HEADER = ("row_number_per_file", "prediction", "batch_input_file_name")
PROMPT_COLUMNS = ("input_string", "text")
RETRY_S = 0.05  # wait before resubmitting when the engine's queue is full


# ---- the output file: whole records only ------------------------------------------------------


def _complete_prefix(data: bytes, quoted: bool) -> int:
    """Bytes of data that form whole records: up to the last newline (outside CSV quotes)."""
    if not quoted:
        return data.rfind(b"\n") + 1
    end, inside = 0, False
    for i, b in enumerate(data):
        if b == 0x22:  # '"': a doubled "" inside a field toggles twice
            inside = not inside
        elif b == 0x0A and not inside:
            end = i + 1
    return end


class RecordFile:
    """An append-only file of newline-terminated records that survives being killed mid-write."""

    def __init__(self, path: Path, *, quoted: bool, header: str = ""):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes() if path.exists() else b""
        keep = _complete_prefix(data, quoted)
        if header and not data[:keep].startswith(header.encode()):
            if not header.encode().startswith(data):
                raise UserError(f"{path} exists and is not a predictions file written by score; move it away")
            keep = 0  # a torn header: start over
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if keep < len(data):
            os.ftruncate(self.fd, keep)  # a torn last record, from a run that was killed
            os.fsync(self.fd)
        self.text = data[:keep].decode("utf-8", errors="replace")
        if header and keep == 0:
            self.append(header)

    def append(self, record: str) -> None:
        data = record.encode("utf-8")
        while data:  # one write for a regular file; the loop only guards a short write
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ---- items -------------------------------------------------------------------------------------------


@dataclass
class Item:
    key: str  # the record's identity in OUTPUT
    answer: Callable[[Service], Awaitable[str]]  # -> the output record, newline-terminated


def _batch_id(custom_id: object, line: int) -> str:
    seed = f"custom_id:{custom_id}" if isinstance(custom_id, str) else f"line:{line}"
    return "batch_req_" + hashlib.sha256(seed.encode()).hexdigest()[:24]


def batch_items(path: Path) -> list[Item]:
    """OpenAI Batch JSONL lines -> items; duplicate custom_ids refuse the whole file (as OpenAI does)."""
    items, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            obj, problem = {}, f"line {n} is not JSON ({e.msg})"
        else:
            problem = None if isinstance(obj, dict) else f"line {n} is not a JSON object"
            obj = obj if isinstance(obj, dict) else {}
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


def csv_items(source: Path, parameters: dict) -> list[Item]:
    files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".csv") if source.is_dir() else [source]
    if not files:
        raise UserError(f"{source} has no .csv files")
    items = []
    for f in files:
        with f.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
            if column is None:
                raise UserError(f"{f} has no {' or '.join(PROMPT_COLUMNS)} column (columns: {reader.fieldnames})")
            for row, record in enumerate(reader):
                items.append(Item(json.dumps([f.name, row]), _csv_answer(f.name, row, record[column] or "", parameters)))
    return items


def _csv_input(cell: str) -> list:
    """A cell is a prompt, or a JSON list of chat messages."""
    if cell.lstrip().startswith("["):
        try:
            messages = json.loads(cell)
        except json.JSONDecodeError:
            return [cell]
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            return messages
    return [cell]


def _csv_answer(name: str, row: int, cell: str, parameters: dict):
    async def answer(service: Service) -> str:
        try:
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
    """The items, the output file (torn tail cut) and the keys it already holds."""
    if not source.exists():
        raise UserError(f"{source} does not exist")
    if source.is_dir() or source.suffix.lower() == ".csv":
        if output.exists() and not output.is_dir():
            raise UserError(f"{output} must be a folder for CSV input (predictions go to {output / PREDICTIONS})")
        params = parse_parameters(parameters or {})
        items = csv_items(source, params)
        out = RecordFile(output / PREDICTIONS, quoted=True, header=",".join(CSV_HEADER) + "\n")
        done = {json.dumps([r[2], int(r[0])]) for r in list(csv.reader(io.StringIO(out.text)))[1:] if len(r) == 3}
    else:
        if output.is_dir():
            raise UserError(f"{output} is a folder; for an OpenAI Batch file give the output .jsonl file")
        items = batch_items(source)
        out = RecordFile(output, quoted=False)
        done = {json.loads(line)["id"] for line in out.text.splitlines() if line.strip()}
    return items, out, done


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
