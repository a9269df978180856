"""`llama2-onnx score` against hostile paths and input (serve/score_files.py, serve/score.py): it writes
only to a new OUTPUT or to its own output for the same INPUT, refuses everything else with one line
and exit code 2 leaving every file byte for byte as it was, and an input line or cell it cannot read
fails alone."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.serve.score import _batch_id  # noqa: E402
from llama2_onnx.serve.score_files import CSV_LAYOUT, JSONL_LAYOUT, RecordFile, csv_key  # noqa: E402

HEADER = CSV_LAYOUT.header


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llama2_onnx.cli", "score", *args, "--provider", "cpu", "--threads", "1"]


def no_runaway_memory() -> None:
    # the old score read /dev/full until it was killed for memory: cap it, so a regression fails fast
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=no_runaway_memory, env=env)


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def snapshot(*paths: Path) -> dict:
    """Every file under paths -> its bytes (None: the path does not exist; a FIFO or device: its mode)."""
    shot = {}
    for top in paths:
        for p in [top, *sorted(top.rglob("*"))] if top.is_dir() and not top.is_symlink() else [top]:
            if not os.path.lexists(p):
                shot[p] = None
            elif p.is_symlink() or not (p.is_file() or p.is_dir()):
                shot[p] = os.lstat(p).st_mode
            elif p.is_file():
                shot[p] = p.read_bytes()
    return shot


def request(cid: str, model: str = "m", **body) -> str:
    body = {"model": model, "prompt": f"Story {cid}:", "max_tokens": 4, "temperature": 0, **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body})


def record(cid: str, line: int, **extra) -> bytes:
    """A record as score writes it for custom_id cid on input line `line`."""
    out = {"id": _batch_id(cid, line), "custom_id": cid, "response": None, "error": None, **extra}
    return json.dumps(out).encode() + b"\n"


# ---- OUTPUT that is not score's own: refused, untouched -----------------------------------------------


OURS = record("req-0", 1)
NOT_OURS = {
    "notes": b"notes 1\nline 2",  # the report: its last line was cut, then a traceback
    "other keys": b'{"a": 1}\n',
    "an extra key": record("req-0", 1, extra=1),
    "another input's record": record("other", 1),
    "ours, then a tail that is no record": OURS + b"line 2",
    "ours, then a blank line": OURS + b"\n",
    "not UTF-8": OURS[:-3] + b'\xff"}\n',
}


@pytest.mark.parametrize("name", NOT_OURS)
def test_jsonl_output_not_ours_is_refused_untouched(name, tiny_onnx_ort, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "notes.txt"
    src.write_text(request("req-0") + "\n" + request("req-1") + "\n")
    out.write_bytes(NOT_OURS[name])
    before = snapshot(src, out)
    assert_refused(run(cli(str(src), str(out), str(tiny_onnx_ort))), str(out), "not score's output")
    assert snapshot(src, out) == before


def csv_input(folder: Path, name: str = "a.csv") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("input_string\nHello\nWorld\n", encoding="utf-8")
    return folder / name


def inputs(tmp_path: Path) -> dict[str, Path]:
    """A JSONL file and a folder of one CSV file, each of one or two requests."""
    (tmp_path / "in.jsonl").write_text(request("req-0") + "\n")
    csv_input(tmp_path / "in")
    return {"jsonl": tmp_path / "in.jsonl", "csv": tmp_path / "in"}


@pytest.mark.parametrize("link", ["itself", "symbolic link", "hard link"])
def test_jsonl_output_that_is_the_input_is_refused(link, tiny_onnx_ort, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(request("only"))  # one request, no final newline: the old score answered it over itself
    if link == "itself":
        out = src
    else:
        out.symlink_to(src) if link == "symbolic link" else os.link(src, out)
    before = snapshot(tmp_path)
    assert_refused(run(cli(str(src), str(out), str(tiny_onnx_ort))), "is the input file")
    assert snapshot(tmp_path) == before


CSV_NOT_OURS = {
    "another header": b"x,y\n1,2\n",
    "another input's row": HEADER + b"0,hi,zzz.csv\n",
    "a row of 2 fields": HEADER + b"0,hi\n",
    "a row number that is no number": HEADER + b"x,hi,a.csv\n",
    "ours, then a tail that is no row": HEADER + b"0,hi,a.csv\nhello",
}


@pytest.mark.parametrize("name", CSV_NOT_OURS)
def test_csv_predictions_not_ours_are_refused_untouched(name, tiny_onnx_ort, tmp_path):
    src, out = csv_input(tmp_path / "in"), tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_bytes(CSV_NOT_OURS[name])
    before = snapshot(tmp_path)
    assert_refused(run(cli(str(src), str(out), str(tiny_onnx_ort))), "not score's output")
    assert snapshot(tmp_path) == before


def fifo(path: Path) -> Path:
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    return path


def symlink(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def predictions_linked_to_input(t: Path) -> Path:
    (t / "out").mkdir()
    os.link(t / "in" / "a.csv", t / "out" / "predictions.csv")
    return t / "out"


def input_named_predictions(t: Path) -> Path:
    os.rename(t / "in" / "a.csv", t / "in" / "predictions.csv")
    return t / "in" / "predictions.csv"


CSV_IS_INPUT = {  # case -> (OUTPUT made in tmp_path, INPUT when not the folder `in`, what the one line says)
    "the input folder": (lambda t: t / "in", None, "is the INPUT folder"),
    "a link to the input folder": (lambda t: symlink(t / "link", t / "in"), None, "is the INPUT folder"),
    "predictions.csv a hard link to an input": (predictions_linked_to_input, lambda t: t / "in" / "a.csv", "is the input file"),
    "the input file's folder, the input predictions.csv": (lambda t: t / "in", input_named_predictions, "is the input file"),
}


@pytest.mark.parametrize("case", CSV_IS_INPUT)
def test_csv_output_that_is_the_input_is_refused(case, tiny_onnx_ort, tmp_path):
    make_out, make_src, words = CSV_IS_INPUT[case]
    src = inputs(tmp_path)["csv"]
    src = make_src(tmp_path) if make_src else src
    out = make_out(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(run(cli(str(src), str(out), str(tiny_onnx_ort))), words)
    assert snapshot(tmp_path) == before


# ---- OUTPUT paths that cannot be used -------------------------------------------------------------------


UNUSABLE = {  # case -> (INPUT, OUTPUT made in tmp_path, what the one line says)
    "jsonl in a missing folder": ("jsonl", lambda t: t / "missing" / "o.jsonl", "folder {t}/missing does not exist; create it first"),
    "csv folder in a missing folder": ("csv", lambda t: t / "missing" / "out", "folder {t}/missing does not exist; create it first"),
    "/dev/full": ("jsonl", lambda t: Path("/dev/full"), "/dev/full is not a regular file"),  # the old score read it until killed
    "a FIFO": ("jsonl", lambda t: fifo(t / "fifo"), "fifo is not a regular file"),  # the old score blocked reading it
    "predictions.csv a FIFO": ("csv", lambda t: fifo(t / "out" / "predictions.csv").parent, "predictions.csv is not a regular file"),
    "a broken symbolic link": ("jsonl", lambda t: symlink(t / "o", t / "nowhere"), "broken symbolic link"),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_unusable_output_path_is_one_line(case, tiny_onnx_ort, tmp_path):
    kind, make_out, words = UNUSABLE[case]
    src, out = inputs(tmp_path)[kind], make_out(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(run(cli(str(src), str(out), str(tiny_onnx_ort))), words.format(t=tmp_path))
    assert snapshot(tmp_path) == before


def unprivileged(cmd: list[str]) -> list[str]:
    """cmd as a user whose writes chmod can stop. Root (as in CI) runs it as nobody, keeping only the
    right to read and search every folder (CAP_DAC_READ_SEARCH: the venv may live under /root), so
    its writes are checked as nobody's."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no way to run score as a user chmod stops")
    wrapped = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *cmd]
    probe = subprocess.run(wrapped[:-len(cmd)] + [sys.executable, "-c", "import llama2_onnx.serve.score"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot run score as nobody here: {probe.stderr.strip()[-200:]}")
    return wrapped


UNWRITABLE = {  # case -> (INPUT, OUTPUT in the read-only folder ro, the path the one line names, verb)
    "a read-only file of ours": ("jsonl", "out.jsonl", "out.jsonl", "write"),
    "a new file": ("jsonl", "new.jsonl", "new.jsonl", "write"),
    "a folder": ("csv", "", "predictions.csv", "write"),
    "a new folder": ("csv", "sub", "sub", "create"),
}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_output_is_refused_untouched(case, tiny_onnx_ort, tmp_path):
    kind, out, named, verb = UNWRITABLE[case]
    src, ro = inputs(tmp_path)[kind], tmp_path / "ro"
    ro.mkdir()
    (ro / "out.jsonl").write_bytes(b'{"id": "batch_req_')  # ours, torn: score would cut it if it could write
    (ro / "out.jsonl").chmod(0o444)
    ro.chmod(0o555)
    home = tmp_path / "home"  # onnxruntime keeps a telemetry id there, or warns on stderr
    home.mkdir()
    home.chmod(0o777)
    try:
        before = snapshot(src, ro)
        r = run(unprivileged(cli(str(src), str(ro / out), str(tiny_onnx_ort))), env=dict(os.environ, HOME=str(home)))
        assert_refused(r, f"cannot {verb} {ro / named}: Permission denied")
        assert snapshot(src, ro) == before
    finally:
        ro.chmod(0o755)


# ---- input that cannot be read fails only its own item -------------------------------------------------


def test_jsonl_lines_that_cannot_be_read_fail_alone(tiny_onnx_ort, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    model = tiny_onnx_ort.name
    lines = [request("req-0", model).encode(),
             request("caf_MARK", model).encode().replace(b"_MARK", b"\xe9"),  # line 2: one byte not UTF-8
             b"[" * 5000 + b"]" * 5000,  # line 3: json.loads raises RecursionError
             b'{"custom_id": "big", "n": ' + b"9" * 5000 + b"}",  # line 4: int() refuses 5000 digits
             request("\ud800", model).encode(),  # line 5: a lone surrogate, escaped: no UTF-8 for it
             request("req-1", model).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    r = run(cli(str(src), str(out), str(tiny_onnx_ort)))
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(lines)
    errors = {r["error"]["message"].split()[1]: r for r in records if r["error"]}
    assert "not UTF-8" in errors["2"]["error"]["message"] and errors["2"]["response"] is None
    assert "nested too deeply" in errors["3"]["error"]["message"]
    assert "a number is too long" in errors["4"]["error"]["message"] and errors["4"]["error"]["code"] == "invalid_request"
    by_cid = {r["custom_id"]: r for r in records if r["custom_id"]}
    assert by_cid["req-0"]["response"]["status_code"] == 200 and by_cid["req-1"]["response"]["status_code"] == 200
    assert by_cid["\ud800"]["response"] is not None  # answered (or refused by the API), its record written
    again = run(cli(str(src), str(out), str(tiny_onnx_ort)))  # every record, the surrogate's too, is recognised
    assert again.returncode == 0 and "0 answered" in again.stderr, again.stderr


def test_csv_cells_that_cannot_be_read_fail_alone(tiny_onnx_ort, tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out"
    deep_messages = '[{"role": "user", "content": ' + "[" * 5000 + "]" * 5000 + "}]"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input_string"])
        for cell in ("Hello", "CAFE_MARK", "[" * 5000 + "]" * 5000, deep_messages, "World"):
            w.writerow([cell])
    src.write_bytes(src.read_bytes().replace(b"CAFE_MARK", b"caf\xe9"))  # row 1: one byte not UTF-8
    params = json.dumps({"max_new_tokens": 4})
    r = run(cli(str(src), str(out), str(tiny_onnx_ort), "--parameters", params))
    assert r.returncode == 0, r.stderr
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as f:
        rows = {int(row[0]): row[1] for row in list(csv.reader(f))[1:]}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert "not UTF-8 (byte 0xe9" in json.loads(rows[1])["error"]["message"]
    assert rows[0].startswith("Hello") and rows[4].startswith("World")
    again = run(cli(str(src), str(out), str(tiny_onnx_ort), "--parameters", params))
    assert again.returncode == 0 and "0 answered" in again.stderr, again.stderr


# ---- the torn last record: cut only when it could be one of ours ----------------------------------------


KEYS = {_batch_id("req-0", 1), _batch_id("req-1", 2)}
TORN = [  # (layout, file, what is kept, or None: refused and left as it was)
    (JSONL_LAYOUT, b"", b""),
    (JSONL_LAYOUT, OURS + b'{"id": "batch_req_torn", "cust', OURS),
    (JSONL_LAYOUT, OURS + b'{"id": "bat', OURS),
    (JSONL_LAYOUT, b'{"id": "b', b""),
    (JSONL_LAYOUT, OURS + b'{"id": 1', None),
    (JSONL_LAYOUT, b"notes 1\nline 2", None),
    (CSV_LAYOUT, b"row_number_per", HEADER),  # a torn header: start over
    (CSV_LAYOUT, HEADER + b'0,hi,a.csv\n1,"half a\nprediction', HEADER + b"0,hi,a.csv\n"),
    (CSV_LAYOUT, HEADER + b"0,hi,a.csv\n12", HEADER + b"0,hi,a.csv\n"),
    (CSV_LAYOUT, HEADER + b"0,hi,a.csv\nnotes", None),
    (CSV_LAYOUT, b"row_number_per_file,x", None),
    (CSV_LAYOUT, b"notes", None),
]


@pytest.mark.parametrize("layout, data, kept", TORN)
def test_torn_last_record_is_cut_only_when_it_could_be_ours(layout, data, kept, tmp_path):
    path = tmp_path / "out"
    path.write_bytes(data)
    keys = {csv_key("a.csv", 0), csv_key("a.csv", 1)} if layout is CSV_LAYOUT else KEYS
    if kept is None:
        with pytest.raises(UserError, match="not score's output"):
            RecordFile(path, layout, keys)
        assert path.read_bytes() == data
    else:
        RecordFile(path, layout, keys).close()
        assert path.read_bytes() == kept


def test_a_run_that_fails_before_answering_leaves_no_new_output(tmp_path):
    """The model folder is checked after OUTPUT is opened: a new OUTPUT (file, or CSV folder) made by
    a run that then fails is removed again."""
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(request("a") + "\n")
    table = tmp_path / "in.csv"
    table.write_text("input_string\nhello\n")
    for src, out in ((jsonl, tmp_path / "new.jsonl"), (table, tmp_path / "new-folder")):
        r = run(cli(str(src), str(out), str(tmp_path / "no-such-model")))
        assert_refused(r)
        assert not os.path.lexists(out), out


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    """Two runs on one OUTPUT would answer items twice and cut each other's records: the second is refused."""
    path = tmp_path / "out.jsonl"
    first = RecordFile(path, JSONL_LAYOUT, {"k"})
    try:
        with pytest.raises(UserError, match="another score run"):
            RecordFile(path, JSONL_LAYOUT, {"k"})
    finally:
        first.close()
    RecordFile(path, JSONL_LAYOUT, {"k"}).close()  # free again once the first has closed
