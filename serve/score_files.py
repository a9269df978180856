"""The files of `llama2-onnx score`: which paths it may read and write, and OUTPUT as an append-only
file of records that a kill cannot corrupt and that score recognises as its own. The rules are
stated in serve/score.py's docstring; everything here refuses with a UserError (one line)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from llama2_onnx.errors import UserError

PREDICTIONS = "predictions.csv"
CSV_HEADER = ("row_number_per_file", "prediction", "batch_input_file_name")
RECORD_KEYS = frozenset({"id", "custom_id", "response", "error"})  # of a JSONL output record


def csv_key(name: str, row: int) -> str:
    """A CSV row's identity, in INPUT's items and in OUTPUT's records."""
    return json.dumps([name, row])


# ---- paths: what score may read and write ------------------------------------------------------


def _os_error(path: Path, doing: str, e: OSError) -> UserError:
    if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
        return UserError(f"folder {path.parent} does not exist; create it first")
    fix = "; change its permissions or choose another path" if isinstance(e, PermissionError) else ""
    return UserError(f"cannot {doing} {path}: {e.strerror or e}{fix}")


def stat_or_none(path: Path, doing: str) -> os.stat_result | None:
    """path's stat (following links), or None when it does not exist."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"{path} is a broken symbolic link; remove it or choose another path") from None
        return None
    except OSError as e:
        raise _os_error(path, doing, e) from None


def read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _os_error(path, "read", e) from None


def _new_in_existing_folder(path: Path) -> None:
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist; create it first"
        raise UserError(f"folder {path.parent} {what}")


def not_an_input(output: Path, inputs: list[Path]) -> None:
    """score would overwrite what it reads: OUTPUT must not be an input file, by any name."""
    for f in inputs:
        if os.path.samefile(f, output):
            raise UserError(f"OUTPUT {output} is the input file {f}; choose another OUTPUT")


def csv_output_folder(output: Path, source: Path, files: list[Path]) -> bool:
    """Check a CSV OUTPUT folder, making it (not its parents) when it does not exist; True if made."""
    st = stat_or_none(output, "use")
    if st is None:
        _new_in_existing_folder(output)
        try:
            output.mkdir()
        except OSError as e:
            raise _os_error(output, "create", e) from None
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{output} must be a folder for CSV input (predictions go to {output / PREDICTIONS})")
    if source.is_dir() and os.path.samefile(source, output):
        raise UserError(f"OUTPUT {output} is the INPUT folder, whose .csv files are the input; choose another folder")
    if stat_or_none(output / PREDICTIONS, "use") is not None:
        not_an_input(output / PREDICTIONS, files)
    return False


# ---- the output file: whole records only, and only ours ------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What score writes into one kind of OUTPUT, so that it can tell its own file from any other."""
    header: bytes  # written first, once (b"" for none)
    quoted: bool  # a record may hold newlines inside "quotes" (CSV)
    keys: Callable[[str], Iterator[str | None]]  # whole records -> each one's key; None: not a record of ours
    torn: Callable[[bytes], bool]  # could these bytes be the start of one of our records, cut by a kill?


def _starts(data: bytes, prefix: bytes) -> bool:
    """data begins with prefix, or is cut short inside it."""
    return data.startswith(prefix) or prefix.startswith(data)


JSONL_START = b'{"id": "batch_req_'  # json.dumps of a record: "id" first, default separators


def _jsonl_keys(text: str) -> Iterator[str | None]:
    for line in text.split("\n")[:-1]:  # not splitlines(): a record may hold U+2028 and the like
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        ok = isinstance(record, dict) and record.keys() == RECORD_KEYS and isinstance(record["id"], str)
        yield record["id"] if ok else None


CSV_ROW_START = re.compile(rb"[0-9]+(,[\s\S]*)?")  # a row number, then the rest of a row


def _csv_keys(text: str) -> Iterator[str | None]:
    try:
        for row in csv.reader(io.StringIO(text, newline="")):
            ok = len(row) == 3 and row[0].isascii() and row[0].isdigit()
            yield csv_key(row[2], int(row[0])) if ok else None
    except csv.Error:  # e.g. a field over the csv module's size limit
        yield None


JSONL_LAYOUT = Layout(b"", quoted=False, keys=_jsonl_keys, torn=lambda tail: _starts(tail, JSONL_START))
CSV_LAYOUT = Layout((",".join(CSV_HEADER) + "\n").encode(), quoted=True, keys=_csv_keys,
             torn=lambda tail: CSV_ROW_START.fullmatch(tail) is not None)


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


def _may_begin(data: bytes, layout: Layout) -> bool:
    """Could a file of layout's records begin with data?"""
    return _starts(data, layout.header) if layout.header else layout.torn(data)


def _open_own(path: Path, layout: Layout) -> tuple[int, bool, bytes]:
    """(a descriptor open for appending, whether the file is new, its bytes); refused unless it is
    a new file or a regular file that begins as ours. The file is locked (flock) for this run and
    read through the descriptor it is later written with, so what is checked is what is written:
    a second run on the same OUTPUT is refused rather than left to cut the first one's records."""
    st = stat_or_none(path, "use")
    if st is None:
        _new_in_existing_folder(path)
    elif not stat.S_ISREG(st.st_mode):  # before any open: opening a FIFO would wait for a writer
        raise UserError(f"{path} is not a regular file; choose another OUTPUT")
    new = st is None
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | (os.O_CREAT | os.O_EXCL if new else 0), 0o644)
    except OSError as e:
        raise _os_error(path, "write", e) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the stat above
            raise UserError(f"{path} is not a regular file; choose another OUTPUT")
        _lock(fd, path)
        head = os.pread(fd, 64, 0)  # a file of someone else's is refused before it is read whole
        if head and not _may_begin(head, layout):
            raise _not_ours(path, "it does not begin as score's output does")
        return fd, new, _read_all(fd)
    except BaseException:
        os.close(fd)
        if new:
            path.unlink(missing_ok=True)
        raise


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run at a time is then the user's to keep
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{path} is being written by another score run; wait for it or choose another OUTPUT") from None


def _read_all(fd: int) -> bytes:
    parts, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _not_ours(path: Path, why: str) -> UserError:
    return UserError(f"{path} exists and is not score's output for this INPUT ({why}); move it away or choose another OUTPUT")


def _own_keys(path: Path, data: bytes, keep: int, layout: Layout, keys: set[str]) -> set[str]:
    """The keys of data[:keep], its whole records; refused unless each is ours and for one of keys, and
    the rest (a torn record) could begin one."""
    tail = data[keep:]
    if tail and not (layout.torn(tail) if keep else _may_begin(tail, layout)):
        raise _not_ours(path, "its last line is not a torn record of score's")
    if keep and not data.startswith(layout.header):
        raise _not_ours(path, "its header is not score's")
    try:
        text = data[len(layout.header):keep].decode("utf-8") if keep else ""
    except UnicodeDecodeError:
        raise _not_ours(path, "it is not UTF-8") from None
    done = set()
    for n, key in enumerate(layout.keys(text), 1):
        if key is None:
            raise _not_ours(path, f"record {n} is not one score writes")
        if key not in keys:
            raise _not_ours(path, f"record {n} answers no item of INPUT")
        done.add(key)
    return done


class RecordFile:
    """An append-only file of layout's newline-terminated records that survives being killed
    mid-write. It opens only a new file or score's own output for the items `keys` (see the module
    docstring), and cuts a torn last record only after every check has passed."""

    def __init__(self, path: Path, layout: Layout, keys: set[str], *, made_folder: bool = False):
        self.path, self.made_folder = path, made_folder
        self.appended = 0
        self.fd, self.new, data = _open_own(path, layout)  # new: discard() removes only what this run made
        keep = _complete_prefix(data, layout.quoted)
        try:
            self.done = _own_keys(path, data, keep, layout, keys)  # keys already answered
        except BaseException:
            os.close(self.fd)
            raise
        if keep < len(data):
            os.ftruncate(self.fd, keep)  # a torn last record, from a run that was killed
            os.fsync(self.fd)
        if layout.header and keep == 0:
            self.append(layout.header.decode())
        self.appended = 0  # records, the header not counted

    def append(self, record: str) -> None:
        # a lone surrogate (a \udXXX escape in the input) has no UTF-8; written as that escape, it
        # reads back as the same string in a JSON record
        data = record.encode("utf-8", errors="backslashreplace")
        try:
            while data:  # one write for a regular file; the loop only guards a short write
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
            self.appended += 1
        except OSError as e:  # a full disk: what is written stays, the rerun goes on from there
            raise _os_error(self.path, "write", e) from None

    def close(self) -> None:
        os.close(self.fd)

    def discard(self) -> None:
        """Close; a file (and CSV folder) this run made and wrote no record into is removed, so a run
        that fails before its first answer (the model would not load) leaves nothing behind."""
        self.close()
        if self.new and not self.appended:
            self.path.unlink(missing_ok=True)
            if self.made_folder:
                with contextlib.suppress(OSError):  # not empty after all: leave it, the real error is raised
                    self.path.parent.rmdir()
