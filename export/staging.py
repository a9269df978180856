"""Write the model folder atomically: build it in a temporary sibling folder, rename at the end.

    with staging(out, overwrite, checkpoint_paths) as tmp:   # checks, locks, repairs, makes tmp
        ...write every file into tmp...                      # tmp replaces out when the block ends

A failure or a kill halfway leaves at most a hidden ``.OUT.partial-*`` folder, never an
OUT that looks complete (folder.finish writes the manifest last). Ctrl-C, SIGTERM and SIGHUP remove it
on the way out; a folder a harder kill left is removed by the next export to OUT, which holds
``.OUT.lock`` (flock) while it works, so no export removes the folder of one still going.
Replacing OUT takes two renames (OUT aside to ``.OUT.old-*``, the new folder in): a kill
between them is repaired by the next export to OUT, which puts the old folder back.

Never written: the checkpoint (OUT may not be, hold or lie inside it), or with ``--overwrite``
a folder that is neither empty nor a model folder (one with our manifest).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from llama2_onnx.errors import UserError
from llama2_onnx.runtime import contract


class OutputExistsError(UserError):
    pass


class OutputWriteError(UserError):
    """The model folder cannot be written: permissions, a read-only file system, a full disk, a size limit."""


def _relation(out: Path, place: Path) -> str | None:
    """How out (resolved) stands to a checkpoint path (resolved): 'is', 'holds', 'lies inside' or None."""
    if out == place:
        return "is"
    if place.is_relative_to(out):
        return "holds"
    if out.is_relative_to(place):
        return "lies inside"
    return None


def check_out(out: Path, overwrite: bool, checkpoint: Iterable[Path] = ()) -> None:
    """Refuse early (before any work) an OUT that is, holds or lies inside the checkpoint (paths and
    symlinks resolved; checkpoint: ``models.checkpoint.checkpoint_paths``), a non-empty OUT without
    --overwrite, and with it a non-empty OUT that is no model folder."""
    resolved = out.resolve()
    for place in checkpoint:
        how = _relation(resolved, Path(place).resolve())
        if how:
            raise OutputExistsError(f"{out} {how} the checkpoint {place}: write the model to a folder outside the checkpoint")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; choose a folder path for the model")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite to replace it or choose another folder")
        if not is_model_folder(out):
            raise OutputExistsError(f"{out} is not a llama2-onnx model folder (no {contract.MANIFEST_FILE} listing "
                                    f"{contract.MODEL_FILE}) and --overwrite replaces only those: remove it yourself "
                                    "or choose another folder")


def is_model_folder(folder: Path) -> bool:
    """Whether folder holds our manifest (a JSON object whose files name the graph): a web app's
    manifest.json is not one."""
    try:
        files = json.loads((folder / contract.MANIFEST_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(files, dict) and contract.MODEL_FILE in files


def write_error(e: OSError, folder: Path) -> OutputWriteError | None:
    """One line with what to do for an error writing into folder; None: not a write error we know."""
    where = f"writing the model under {folder}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputWriteError(f"no space left on the device ({where}): free some space or choose a folder on another disk")
    if e.errno == errno.EFBIG:
        return OutputWriteError(f"a file passed the file-size limit ({where}): raise the limit (ulimit -f unlimited) or "
                                "choose a file system that holds large files (FAT32 stops at 4 GiB)")
    named = isinstance(e.filename, (str, bytes, os.PathLike))
    mine = e.filename is None or named and Path(os.fsdecode(e.filename)).absolute().is_relative_to(folder.absolute())
    if e.errno == errno.EROFS and mine:
        return OutputWriteError(f"cannot write to {folder}: it is on a read-only file system; choose a folder on a writable one")
    if e.errno in (errno.EACCES, errno.EPERM) and mine:
        return OutputWriteError(f"cannot write to {folder} (permission denied): choose a folder you can write to or fix its permissions")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and mine:
        return OutputWriteError(f"cannot make the folder {folder}: part of that path is a file; choose another path")
    if e.filename is not None and mine:  # errors without a file name may be the checkpoint's (reads by offset)
        return OutputWriteError(f"cannot write {os.fsdecode(e.filename)} ({e.strerror}): choose another folder or name")
    return None


@contextlib.contextmanager
def _write_errors(folder: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        mapped = write_error(e, folder)
        if mapped is None:
            raise
        raise mapped from None


# Signals that end an export the way Ctrl-C does (an exception, so the staging folder is removed).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Signals:
    """While exporting (main thread only): SIGTERM/SIGHUP raise SystemExit(128 + signal) as Ctrl-C
    raises KeyboardInterrupt, and none of them interrupts a ``hold()`` block (the swap); SIGXFSZ is
    ignored, so that a write past the file-size limit fails with EFBIG instead of killing the process.
    Signals already ignored (nohup's SIGHUP) or handled by the application are left alone."""

    def __init__(self) -> None:
        self.holding, self.pending = False, None
        self.previous: dict[int, object] = {}

    def _stop(self, signum, frame) -> None:
        for s in self.previous:
            if s != signal.SIGXFSZ:
                signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        if self.holding:
            self.pending = signum
        else:
            self._raise(signum)

    @staticmethod
    def _raise(signum: int):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            ours = {**{s: (signal.SIG_DFL, self._stop) for s in STOP_SIGNALS},
                    signal.SIGINT: (signal.default_int_handler, self._stop),
                    signal.SIGXFSZ: (signal.SIG_DFL, signal.SIG_IGN)}
            for s, (default, handler) in ours.items():
                if signal.getsignal(s) == default:
                    self.previous[s] = signal.signal(s, handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Defer the signals' exceptions to the end of the block."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.pending is not None:
                self._raise(self.pending)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold .OUT.lock beside OUT (flock, released by the kernel when the process dies, however it dies)."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(f"another export is writing {out} (it holds {path.name}): wait for it to finish "
                                    "or choose another folder") from None
        # the last holder removes the file when done: make sure ours is still the one at the path
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _leftovers(out: Path, kind: str) -> list[Path]:
    """The .OUT.partial-XXXXXXXX (or .old-) folders tempfile.mkdtemp made beside OUT."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{kind}-[a-z0-9_]{{8}}")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _recover(out: Path) -> None:
    """Repair what interrupted exports to OUT left; runs under the lock, so none of them is still going."""
    for old in _leftovers(out, "old"):
        kept = old / out.name
        if kept.exists() and not out.exists() and not out.is_symlink():
            os.replace(kept, out)  # killed between the two renames of a replace: put OUT back
        shutil.rmtree(old, ignore_errors=True)
    for partial in _leftovers(out, "partial"):
        shutil.rmtree(partial, ignore_errors=True)


def _swap(tmp: Path, out: Path) -> None:
    """tmp becomes out; an old out is moved aside first and removed after."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        os.replace(tmp, out)  # rename(2) replaces an empty folder in one step
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) if out.exists() or out.is_symlink() else None
    if old is not None:
        os.replace(out, old / out.name)
    os.replace(tmp, out)  # a kill before this line: the next export puts the old OUT back (_recover)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p folder; the folders it made, innermost first (removed again if the export fails)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def staging(out: Path, overwrite: bool, checkpoint: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside out; on success it replaces out, on failure it is removed.

    Holds .OUT.lock throughout; first repairs what earlier, interrupted exports to out left.
    Errors writing (permissions, read-only, disk full, file-size limit) become one-line UserErrors."""
    checkpoint = list(checkpoint)
    check_out(out, overwrite, checkpoint)
    with _Signals() as signals, _write_errors(out.parent):
        made = _make_parents(out.parent)
        try:
            with _lock(out):
                _recover(out)
                check_out(out, overwrite, checkpoint)  # again: _recover may have put OUT back
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
                try:
                    yield tmp
                    with signals.hold():
                        _swap(tmp, out)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        except BaseException:
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
