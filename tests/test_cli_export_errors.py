"""`llama2-onnx export` on bad input and a hostile environment (table-driven): exit 2, one line on
stderr, no traceback, nothing left behind (no OUT, no .partial folder, no lock), checkpoint untouched.

The tree under tmp_path (checkpoint included) is hashed before and after each case and must not change.
Read-only folders and a full disk are simulated with an injected OSError (the tests run as root
in CI, where chmod stops nothing); the file-size limit is real (RLIMIT_FSIZE in a subprocess).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llama2_onnx.cli import main
from llama2_onnx.export import onnx_writer
from llama2_onnx.models import writers
from llama2_onnx.models.config import ModelArgs

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """One small checkpoint per format, copied by each case (cases may try to destroy it)."""
    args = ModelArgs(**SMALL)
    sd = writers.random_state_dict(args, seed=0)
    root = tmp_path_factory.mktemp("small")
    return {
        "hf": writers.write_hf(sd, args, root / "hf"),
        "meta": writers.write_meta(sd, args, root / "meta"),
        "gguf": writers.write_gguf(sd, args, root / "gguf" / "m.gguf"),
    }


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _gguf_with(src: Path, dst: Path, **meta) -> Path:
    """A copy of GGUF src with metadata values replaced (keys with '.' written as '__')."""
    from gguf import GGUFReader, GGUFWriter

    changes = {k.replace("__", "."): v for k, v in meta.items()}
    reader = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by GGUFWriter itself
        value = changes.get(key, field.contents())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2**32:
            w.add_uint64(key, value)
        else:
            writers.add_gguf_value(w, key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.copy(), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _zip_bomb(path: Path, inflated: int = 128 * 2**20) -> None:
    """A torch-style zip whose data.pkl inflates to `inflated` bytes of zeros (a few hundred KB on disk)."""
    path.unlink()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            chunk = bytes(2**20)
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
        z.writestr("archive/byteorder", "little")


class _FailingFile:
    """A file object whose writes fail with errno once `limit` bytes have been written."""

    def __init__(self, f, limit: int, err: int):
        self.f, self.limit, self.err, self.written = f, limit, err, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            raise OSError(self.err, os.strerror(self.err))
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fail_data_writes(monkeypatch, err: int) -> None:
    init = onnx_writer.GraphWriter.__init__

    def failing_init(self, data_path):
        init(self, data_path)
        self._data = _FailingFile(self._data, 4096, err)

    monkeypatch.setattr(onnx_writer.GraphWriter, "__init__", failing_init)


def _read_only(monkeypatch, folder: Path, err: int = errno.EACCES) -> None:
    """folder refuses new entries: chmod for real, and an injected error for root (chmod stops nothing)."""
    folder.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir
    inside = lambda p: Path(os.fsdecode(p)).absolute().parent == folder

    def guarded_open(path, flags, *a, **kw):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_open(path, flags, *a, **kw)

    def guarded_mkdir(path, *a, **kw):
        if inside(path):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


# ---- the cases: (tmp, small checkpoints, monkeypatch) -> (argv, text the error must contain) ------------

def case_out_is_the_checkpoint(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    return [ck, ck, "--overwrite"], "checkpoint"


def case_out_is_the_checkpoint_without_overwrite(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    return [ck, ck], "checkpoint"


def case_out_contains_the_checkpoint(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "models" / "ck")
    return [ck, tmp / "models", "--overwrite"], "checkpoint"


def case_out_is_inside_the_checkpoint(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    return [ck, ck / "onnx"], "checkpoint"


def case_out_is_a_symlink_to_the_checkpoint(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / "link").symlink_to(ck)
    return [ck, tmp / "link", "--overwrite"], "checkpoint"


def case_checkpoint_through_a_symlink(tmp, small, mp):
    ck = _copy(small["meta"], tmp / "real" / "meta")
    (tmp / "alias").symlink_to(tmp / "real")
    return [tmp / "alias" / "meta", tmp / "real", "--overwrite"], "checkpoint"


def case_out_contains_the_gguf_file(tmp, small, mp):
    g = _copy(small["gguf"], tmp / "g" / "m.gguf")
    return [g, tmp / "g", "--overwrite"], "checkpoint"


def case_overwrite_a_folder_that_is_no_model(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work")
    return [ck, tmp / "out", "--overwrite"], "not a llama2-onnx model folder"


def case_overwrite_a_web_app_with_a_manifest(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / "out").mkdir()
    (tmp / "out" / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (tmp / "out" / "index.html").write_text("<html></html>")
    return [ck, tmp / "out", "--overwrite"], "not a llama2-onnx model folder"


# A config value edited in a copy of the checkpoint (or a flag given): (case, checkpoint kind, edits,
# extra export arguments, what the one line names)
CONFIG_EDITS = [
    ("hf_layers_1e9", "hf", {"num_hidden_layers": 10**9}, [], "num_hidden_layers"),
    ("hf_layers_more_than_the_file_holds", "hf", {"num_hidden_layers": 40}, [], "weights hold 2 layers"),
    ("hf_context_1e12_ort", "hf", {"max_position_embeddings": 10**12}, ["--graph", "ort"], "max_position_embeddings"),
    ("max_seq_len_flag_1e12", "hf", {}, ["--graph", "ort", "--max-seq-len", str(10**12)], "--max-seq-len"),
    ("hf_bos_outside_vocab", "hf", {"bos_token_id": 64}, [], "bos_token_id"),
    ("hf_eos_outside_vocab", "hf", {"eos_token_id": [2, 100000]}, [], "eos_token_id"),
    ("hf_pad_negative", "hf", {"pad_token_id": -5}, [], "pad_token_id"),
    ("hf_hidden_size_string", "hf", {"hidden_size": "32"}, [], "hidden_size"),
    ("hf_rms_eps_string", "hf", {"rms_norm_eps": "1e-5"}, [], "rms_norm_eps"),
    ("hf_rope_scaling_list", "hf", {"rope_scaling": [1, 2]}, [], "rope_scaling"),
    ("meta_layers_1e9", "meta", {"n_layers": 10**9}, [], "n_layers"),
    ("meta_multiple_of_zero", "meta", {"multiple_of": 0}, [], "multiple_of"),
]


def _config_case(name: str, kind: str, edits: dict, extra: list[str], expect: str):
    def case(tmp, small, mp):
        ck = _copy(small[kind], tmp / "ck")
        _edit_json(ck / ("config.json" if kind == "hf" else "params.json"), **edits)
        return [ck, tmp / "out", *extra], expect
    case.__name__ = f"case_{name}"
    return case


for _edit in CONFIG_EDITS:
    globals()[f"case_{_edit[0]}"] = _config_case(*_edit)


def case_gguf_block_count_1e9(tmp, small, mp):
    g = _gguf_with(small["gguf"], tmp / "m.gguf", llama__block_count=10**9)
    return [g, tmp / "out"], "block_count"


def case_gguf_context_1e12(tmp, small, mp):
    g = _gguf_with(small["gguf"], tmp / "m.gguf", llama__context_length=10**12)
    return [g, tmp / "out", "--graph", "ort"], "context_length"


def case_gguf_eos_outside_vocab(tmp, small, mp):
    g = _gguf_with(small["gguf"], tmp / "m.gguf", tokenizer__ggml__eos_token_id=4000)
    return [g, tmp / "out"], "eos_token_id"


def case_pth_zip_bomb(tmp, small, mp):
    ck = _copy(small["meta"], tmp / "ck")
    _zip_bomb(ck / "consolidated.00.pth")
    return [ck, tmp / "out"], "data.pkl"


def case_read_only_folder(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / "ro").mkdir()
    _read_only(mp, tmp / "ro")
    return [ck, tmp / "ro" / "out"], "cannot write"


def case_read_only_file_system(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / "ro").mkdir()
    _read_only(mp, tmp / "ro", errno.EROFS)
    return [ck, tmp / "ro" / "out"], "read-only"


def case_out_under_a_file(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / "notes.txt").write_text("a file, not a folder")
    return [ck, tmp / "notes.txt" / "sub" / "out"], "part of that path is a file"


def case_out_name_too_long(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    return [ck, tmp / ("x" * 250)], "File name too long"


def case_disk_full(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    _fail_data_writes(mp, errno.ENOSPC)
    return [ck, tmp / "out"], "no space left"


def case_file_size_limit_injected(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    _fail_data_writes(mp, errno.EFBIG)
    return [ck, tmp / "out"], "file-size limit"


def case_another_export_is_writing_out(tmp, small, mp):
    ck = _copy(small["hf"], tmp / "ck")
    (tmp / ".out.partial-live").mkdir()  # the other run's work: must survive
    (tmp / ".out.partial-live" / "model.onnx.data").write_bytes(b"\0" * 100)
    lock = os.open(tmp / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the running export holds it
    _HELD.append(lock)
    return [ck, tmp / "out"], "another export"


_HELD: list[int] = []  # lock files the cases hold, closed after each case

CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]


def _tree(root: Path) -> dict[str, str]:
    """Every path under root: sha256 for files, the target for links, 'dir' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check_refused(code: int, err: str, text: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("llama2-onnx export: error: ") and text in err, err


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_export_refuses_in_one_line_and_leaves_nothing(case, small, tmp_path, monkeypatch, capsys):
    tmp = tmp_path / "t"
    tmp.mkdir()
    argv, text = case(tmp, small, monkeypatch)
    before = _tree(tmp)
    try:
        code = main(["export", "--quiet", "--no-verify", *map(str, argv)])
    except BaseException as e:  # noqa: BLE001 - a traceback is the failure we test for
        code = f"raised {type(e).__name__}: {e}"
    finally:
        monkeypatch.undo()
        os.chmod(tmp / "ro", 0o755) if (tmp / "ro").exists() else None
        while _HELD:
            os.close(_HELD.pop())
    _check_refused(code, capsys.readouterr().err.strip(), text)
    assert _tree(tmp) == before


def test_file_size_limit_is_one_line_not_a_signal(small, tmp_path):
    """RLIMIT_FSIZE for real: SIGXFSZ would kill the process mid-write unless export ignores it."""
    ck = _copy(small["hf"], tmp_path / "ck")
    before = _tree(tmp_path)
    code = ("import resource, sys\n"
            "from llama2_onnx.cli import main\n"
            "import llama2_onnx.export.api\n"  # imports (and their .pyc files) before the limit
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "export", "--quiet", "--no-verify", str(ck), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    _check_refused(proc.returncode, proc.stderr.strip(), "file-size limit")
    assert _tree(tmp_path) == before
