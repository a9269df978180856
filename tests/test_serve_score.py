"""`llama2-onnx score`: OpenAI Batch and Azure ML CSV, killed with SIGKILL part-way and restarted:
every item answered exactly once; torn last records cut; bad items on their own lines."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.serve.score_files import CSV_LAYOUT, RecordFile, _complete_prefix, csv_key  # noqa: E402

N_BATCH = 40
N_CSV = 2 * 15


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llama2_onnx.cli", "score", *args, "--provider", "cpu", "--threads", "1"]


def batch_file(path: Path, model: str) -> list[str]:
    lines, ids = [], []
    for i in range(N_BATCH):
        cid = f"req-{i}"
        ids.append(cid)
        if i % 2:
            body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 60, "temperature": 0}
            url = "/v1/chat/completions"
        else:
            body = {"model": model, "prompt": f"Story number {i}:", "max_tokens": 60, "temperature": 0}
            url = "/v1/completions"
        if i == 7:
            body["frequency_penalty"] = 3.0  # a bad item (past 2): its own 400 line, the rest go on
        lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}))
    lines.insert(3, "{not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ids


def kill_part_way(cmd: list[str], output: Path, min_records: int, timeout_s: float = 120) -> int:
    """Start cmd, SIGKILL it once output holds min_records newline-ended records; its return code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if output.exists() and output.read_bytes().count(b"\n") >= min_records:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_openai_batch_killed_and_restarted(tiny_onnx_ort, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = batch_file(src, tiny_onnx_ort.name)
    rc = kill_part_way(cli(str(src), str(out), str(tiny_onnx_ort), "--max-batch", "2"), out, min_records=3)
    assert rc == -signal.SIGKILL, "score finished before it could be killed"
    first = out.read_bytes()
    assert first.count(b"\n") < N_BATCH + 1
    with out.open("ab") as f:  # a torn record, as a kill in the middle of a write would leave
        f.write(b'{"id": "batch_req_torn", "custom_id": "req-')
    done = subprocess.run(cli(str(src), str(out), str(tiny_onnx_ort)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    got = [r["custom_id"] for r in records if r["custom_id"] is not None]
    assert sorted(got) == sorted(ids)  # every item exactly once
    assert len(records) == N_BATCH + 1  # + the line that is not JSON
    by_id = {r["custom_id"]: r for r in records}
    assert by_id["req-7"]["response"]["status_code"] == 400
    assert by_id["req-7"]["response"]["body"]["error"]["param"] == "frequency_penalty"
    assert [r for r in records if r["custom_id"] is None][0]["error"]["code"] == "invalid_request"
    ok = [r for r in records if r["response"] and r["response"]["status_code"] == 200]
    assert len(ok) == N_BATCH - 1
    chat = by_id["req-1"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    # greedy: what the killed run wrote equals what a clean run gives
    again = subprocess.run(cli(str(src), str(tmp_path / "clean.jsonl"), str(tiny_onnx_ort)), capture_output=True, timeout=300)
    assert again.returncode == 0
    clean = {json.loads(x)["custom_id"]: json.loads(x) for x in (tmp_path / "clean.jsonl").read_text().splitlines()}
    for cid in ids:
        a, b = by_id[cid]["response"]["body"], clean[cid]["response"]["body"]
        if "choices" in a:
            assert [c.get("text", c.get("message")) for c in a["choices"]] == [c.get("text", c.get("message")) for c in b["choices"]]


def test_azure_csv_folder_killed_and_restarted(tiny_onnx_ort, tmp_path):
    src, out = tmp_path / "csv", tmp_path / "out"
    src.mkdir()
    for name in ("a.csv", "b.csv"):
        with (src / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "input_string"])
            for row in range(N_CSV // 2):
                cell = json.dumps([{"role": "user", "content": f"hi {row}"}]) if row % 3 == 0 else f'Line "{row}",\nof {name}'
                w.writerow([row, "" if (name, row) == ("b.csv", 4) else cell])
    params = json.dumps({"max_new_tokens": 50})
    pred = out / "predictions.csv"
    rc = kill_part_way(cli(str(src), str(out), str(tiny_onnx_ort), "--max-batch", "2", "--parameters", params),
                       pred, min_records=4)
    assert rc == -signal.SIGKILL, "score finished before it could be killed"
    with pred.open("ab") as f:
        f.write(b'3,"half a prediction\nwith a newline')  # torn, with a newline inside its quotes
    done = subprocess.run(cli(str(src), str(out), str(tiny_onnx_ort), "--parameters", params),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with pred.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row_number_per_file", "prediction", "batch_input_file_name"]
    keys = [(r[2], int(r[0])) for r in rows[1:]]
    assert sorted(keys) == sorted((n, r) for n in ("a.csv", "b.csv") for r in range(N_CSV // 2))
    preds = {(r[2], int(r[0])): r[1] for r in rows[1:]}
    assert preds[("a.csv", 1)].startswith('Line "1",\nof a.csv')  # prompt + continuation
    assert json.loads(preds[("b.csv", 4)])["error"]["type"] == "invalid_request_error"  # the empty prompt


def test_complete_prefix_and_record_file(tmp_path):
    assert _complete_prefix(b'a\nb\n"c', quoted=False) == 4
    assert _complete_prefix(b'1,"x\ny",f\n2,"p\nq', quoted=True) == 10
    assert _complete_prefix(b'1,"x ""q"" \n",f\n', quoted=True) == 16
    path, header = tmp_path / "p.csv", CSV_LAYOUT.header
    keys = {csv_key("f", 1), csv_key("f", 2), csv_key("f", 3)}
    path.write_bytes(header + b"1,a,f\n2,\"torn")
    rf = RecordFile(path, CSV_LAYOUT, keys)
    assert rf.done == {csv_key("f", 1)}
    rf.append("3,b,f\n")
    rf.close()
    assert path.read_bytes() == header + b"1,a,f\n3,b,f\n"
    path.write_bytes(b"something else\n")
    with pytest.raises(UserError):
        RecordFile(path, CSV_LAYOUT, keys)
    assert path.read_bytes() == b"something else\n"


def test_bad_arguments_one_line_exit_2(tmp_path, tiny_onnx_ort):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    for args in ([str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")],
                 [str(src), str(tmp_path / "o.jsonl"), str(tiny_onnx_ort), "--max-batch", "0"],
                 [str(src), str(tmp_path / "o.jsonl"), str(tiny_onnx_ort), "--parameters", "{bad"]):
        r = subprocess.run(cli(*args), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
