"""The benchmark harness on the tiny exported model: JSON fields, the arithmetic of rates,
skipped peers, sweeps, plots, and the random-checkpoint script."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from llama2_onnx.benchmarks import harness, make_checkpoint, peers, report, stats
from llama2_onnx.cli import main
from llama2_onnx.errors import UserError

FAST = ["--prompt-len", "8", "--new-tokens", "6", "--repeats", "2", "--warmup", "1", "--bandwidth-mb", "8"]


@pytest.fixture(scope="module")
def bench_json(tiny_onnx, tmp_path_factory):
    """One in-process run of ours (I/O binding on and off) and every peer that needs no build."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(["bench", str(tiny_onnx), *FAST, "--in-process", "--peers", "torch,transformers,genai",
                 "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def ok_rows(result):
    return [r for r in result["rows"] if r["status"] == "ok"]


def test_json_has_every_field(bench_json):
    machine = bench_json["machine"]
    for key in ("cpu_model", "physical_cores", "ort_version", "provider", "read_bandwidth", "versions"):
        assert machine[key] is not None, key
    assert machine["read_bandwidth"]["best"] > 0
    systems = [r["label"] for r in bench_json["rows"]]
    assert systems[:2] == ["ours io-binding on", "ours io-binding off"]
    for row in bench_json["rows"]:
        assert set(row) == set(harness.ROW_FIELDS), row["label"]
        assert row["cpu_model"] == machine["cpu_model"] and row["ort_version"] == machine["ort_version"]
        if row["status"] == "ok":
            assert row["prompt_len"] == 8 and row["new_tokens"] == 6 and row["repeats"] == 2
            assert row["ttft_ms"]["min"] <= row["ttft_ms"]["median"] <= row["ttft_ms"]["max"]
            assert row["decode_ms_per_token"]["p90"] >= row["decode_ms_per_token"]["min"] > 0
            assert row["peak_rss_mb"] > 0 and row["weight_bytes"] > 0
            assert row["bandwidth_gb_s"] > 0 and row["bandwidth_share"] > 0
            assert len(row["tokens"]) == 6


def test_rates_are_tokens_over_time(bench_json):
    for row in ok_rows(bench_json):
        assert row["decode_tokens"] == row["batch"] * (row["new_tokens"] - 1)
        assert row["e2e_tokens"] == row["batch"] * row["new_tokens"]
        for kind in ("decode", "e2e"):
            rate, secs, n = row[f"{kind}_tokens_per_s"], row[f"{kind}_s"], row[f"{kind}_tokens"]
            assert rate["median"] == pytest.approx(n / secs["median"], rel=1e-3)
            assert rate["min"] == pytest.approx(n / secs["max"], rel=1e-3)
            assert rate["max"] == pytest.approx(n / secs["min"], rel=1e-3)


def test_every_system_matches_ours(bench_json):
    rows = ok_rows(bench_json)
    assert {r["system"] for r in rows} >= {"ours", "torch", "genai"}
    for row in rows:
        assert row["tokens_match"] is True and row["match_prefix"] == 6, row["label"]
    assert rows[0]["decode_vs_ours"] == 1.0


def test_missing_peer_is_skipped_not_failed(tiny_onnx, tmp_path, monkeypatch, capsys):
    gone = replace(peers.PEERS["genai"], requires=("no_such_module_for_llama2_onnx",), install="nothing")
    monkeypatch.setitem(peers.PEERS, "genai", gone)
    out = tmp_path / "b.json"
    code = main(["bench", str(tiny_onnx), *FAST, "--in-process", "--io-binding", "on", "--peers", "genai",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert "no_such_module_for_llama2_onnx is not installed" in rows[1]["note"]
    assert set(rows[1]) == set(harness.ROW_FIELDS) and rows[1]["decode_tokens_per_s"] is None
    printed = capsys.readouterr().out
    assert "genai: skipped (no_such_module_for_llama2_onnx is not installed" in printed


def test_failing_peer_is_a_failed_row_not_a_crash(tiny_onnx, monkeypatch):
    def broken(job):
        raise RuntimeError("cannot load\nsecond line")

    monkeypatch.setitem(peers.PEERS, "genai", replace(peers.PEERS["genai"], load=broken))
    for interleave in ("on", "off"):
        result = harness.run_benchmark(model=tiny_onnx, prompt_len=4, new_tokens=3, repeats=1, warmup=0,
                                       io_binding="on", peers=["genai"], isolate=False, interleave=interleave,
                                       bandwidth_mb=8, log=lambda s: None)
        ours, genai = result["rows"]
        assert ours["status"] == "ok" and genai["status"] == "failed"
        assert genai["note"] == "RuntimeError: cannot load"


def test_peer_without_checkpoint_is_skipped(tiny_onnx, tmp_path):
    result = harness.run_benchmark(model=tiny_onnx, prompt_len=4, new_tokens=3, repeats=1, warmup=0,
                                   io_binding="on", peers=["torch"], checkpoint=tmp_path / "nowhere",
                                   isolate=False, bandwidth_mb=8, log=lambda s: None)
    assert result["rows"][1]["status"] == "skipped" and "not found" in result["rows"][1]["note"]


def test_isolated_workers_report_their_own_memory(tiny_onnx):
    result = harness.run_benchmark(model=tiny_onnx, prompt_len=4, new_tokens=3, repeats=1, warmup=0,
                                   io_binding="on", isolate=True, bandwidth_mb=8, log=lambda s: None)
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["memory_isolated"] is True
    assert 0 < row["baseline_rss_mb"] < row["peak_rss_mb"]


def test_sweep_runs_the_product(tiny_onnx, tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    code = main(["bench", str(tiny_onnx), *FAST, "--in-process", "--sweep", "prompt-len=4,12", "--sweep", "batch=1,2",
                 "--json", str(out), "--plot", str(png)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompt_len"], r["batch"], r["io_binding"]) for r in rows] == [
        (p, b, io) for p in (4, 12) for b in (1, 2) for io in (True, False)]
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "prompt_len=4"], "NAME=V1,V2"),
    (["--sweep", "batch=a,b"], "integers"),
    (["--peers", "llama.cpp2"], "unknown peer"),
    (["--new-tokens", "1"], "new tokens >= 2"),
    (["--prompt-len", "200"], "context"),
    (["--threads", "0"], "--threads"),
])
def test_bad_input_is_one_line_exit_2(tiny_onnx, argv, message, capsys):
    assert main(["bench", str(tiny_onnx), "--in-process", "--bandwidth-mb", "8", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("ttft, tokens, batch, want_decode", [
    (10.0, [5.0, 5.0, 10.0], 1, 3 / 0.020),
    (10.0, [2.0, 2.0], 4, 8 / 0.004),
])
def test_summarize(ttft, tokens, batch, want_decode):
    s = stats.summarize([stats.Trace(ttft, tokens)], batch=batch, new_tokens=len(tokens) + 1)
    assert s["decode_tokens_per_s"]["median"] == pytest.approx(want_decode, rel=1e-4)
    assert s["e2e_tokens_per_s"]["median"] == pytest.approx(batch * (len(tokens) + 1) / ((ttft + sum(tokens)) / 1000), rel=1e-4)
    assert s["decode_ms_per_token"]["median"] == pytest.approx(float(np.median(tokens)))


def test_summarize_spread_over_repeats():
    traces = [stats.Trace(t, [t / 10] * 4) for t in (30.0, 10.0, 20.0)]
    s = stats.summarize(traces, batch=1, new_tokens=5)
    assert s["ttft_ms"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    assert s["decode_s"]["median"] == pytest.approx(0.008)
    assert s["decode_tokens_per_s"]["min"] == pytest.approx(4 / 0.012, rel=1e-4)


def test_match_and_bandwidth():
    assert stats.match([1, 2, 3], [1, 2, 3]) == (True, 3)
    assert stats.match([1, 2, 3], [1, 5, 3]) == (False, 1)
    assert stats.match(None, [1]) == (None, None)
    assert stats.bandwidth(1_000_000_000, 20.0, 1, 40.0) == (20.0, 0.5)
    assert stats.bandwidth(1_000_000_000, 20.0, 2, None) == (10.0, None)


def test_parse_sweep_and_points():
    sweep = harness.parse_sweep(["prompt-len=16,128", "threads=1,2"])
    assert sweep == {"prompt_len": [16, 128], "threads": [1, 2]}
    pts = harness.points(harness.Point(8, 8, 1, 2), sweep)
    assert [(p.prompt_len, p.threads) for p in pts] == [(16, 1), (16, 2), (128, 1), (128, 2)]
    with pytest.raises(UserError):
        harness.parse_sweep(["layers=1"])


def test_table_lists_skipped_notes(bench_json):
    fake = {**bench_json, "startup": None, "rows": bench_json["rows"] + [{**bench_json["rows"][0], "label": "x",
                                                                          "status": "skipped", "note": "x is not installed"}]}
    text = report.format_table(fake)
    assert "decode tok/s" in text and "ours io-binding on" in text and "x: skipped (x is not installed)" in text
    md = report.format_markdown(fake).splitlines()
    assert md[0].startswith("| system |") and len(md) == 2 + len(ok_rows(bench_json)) + 1
    assert md[-1] == "- x: skipped (x is not installed)"


def test_startup_is_timed_without_the_cache_then_first_and_second(bench_json):
    starts = bench_json["startup"]  # benchmarks/startup.py: fresh processes
    assert [starts[k]["startup"] for k in ("off", "first", "second")] == ["off", "written", "hit"]
    assert all(s["start_s"] >= s["from_dir_s"] > 0 for s in starts.values())
    assert "second start" in report.format_table(bench_json) and "- start first:" in report.format_markdown(bench_json)


def test_cold_starts_follow_a_page_cache_drop_or_say_why_not(tiny_onnx, tmp_path, monkeypatch):
    """--startup cold: two more fresh starts after dropping the page cache. Here the drop file is a
    stand-in (the real one would empty the whole machine's page cache); one that cannot be written
    gives each cold start a reason instead of a time."""
    from llama2_onnx.benchmarks import startup

    ids = [1, 5, 9, 13]
    monkeypatch.setattr(startup, "DROP_CACHES", str(tmp_path / "drop_caches"))
    starts = startup.measure_startup(str(tiny_onnx), 1, ids, cold=True)
    assert [starts[k]["startup"] for k in startup.STARTS + startup.COLD_STARTS] == ["off", "written", "hit", "off", "hit"]
    assert (tmp_path / "drop_caches").read_text() == "1\n"
    assert any("from a dropped page cache" in line for line in report.startup_lines({"startup": starts}))
    monkeypatch.setattr(startup, "DROP_CACHES", str(tmp_path / "missing" / "drop_caches"))
    starts = startup.measure_startup(str(tiny_onnx), 1, ids, cold=True)
    assert all("cannot be dropped" in starts[k]["error"] for k in startup.COLD_STARTS)
    assert starts["second"]["startup"] == "hit"


def test_decode_ab_alternates_our_folders_in_one_process(tiny_onnx, tiny_onnx_ort, capsys):
    from llama2_onnx.benchmarks import decode_ab

    assert decode_ab.main([str(tiny_onnx_ort), str(tiny_onnx), "--rounds", "2", "--steps", "3", "--prompt-len", "5",
                           "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("ms/step" in line for line in lines)
    assert lines[0].split()[2] == "1.00x" and lines[1].endswith(str(tiny_onnx))
    assert decode_ab.main([str(tiny_onnx.parent / "missing")]) == 2
    assert "decode_ab: error: model folder" in capsys.readouterr().err


def test_bench_cli_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import argparse; "
            "from llama2_onnx.benchmarks import cli, harness, report, worker; "
            "p = argparse.ArgumentParser(); cli.add_arguments(p); p.parse_args(['m', '--peers', 'torch'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_make_checkpoint_tiny(tmp_path):
    from llama2_onnx.models import checkpoint

    out = tmp_path / "ck"
    assert make_checkpoint.main([str(out), "--size", "tiny", "--no-tokenizer", "--dtype", "fp32"]) == 0
    loaded = checkpoint.load(out)
    assert loaded.source == "hf" and loaded.args.dim == make_checkpoint.SIZES["tiny"]["dim"]
    assert make_checkpoint.main([str(out), "--size", "tiny"]) == 2  # refuses a non-empty folder


def test_1b_size_is_the_issue_s():
    assert make_checkpoint.SIZES["1b"] == dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000,
                                               ffn_hidden_dim=5504, max_seq_len=2048)
    assert 0.9e9 < make_checkpoint.parameter_count(make_checkpoint.SIZES["1b"]) < 1.2e9


def test_noise_meter_sees_other_work():
    import os
    import time

    from llama2_onnx.benchmarks.noise import NoiseMeter

    if not os.path.exists("/proc/stat"):
        pytest.skip("Linux only")
    assert NoiseMeter(os.getpid()).stop() is None  # too short to tell
    meter = NoiseMeter(os.getpid())
    time.sleep(0.3)
    quiet = meter.stop()
    assert quiet is not None and 0.0 <= quiet <= 1.0
    stop = time.perf_counter() + 0.4
    child = subprocess.Popen([sys.executable, "-c", f"import time\nwhile time.perf_counter() < {stop} + 0.2: pass"])
    meter = NoiseMeter(os.getpid())  # this process sleeps; the child is "another process"
    time.sleep(0.4)
    busy = meter.stop()
    child.wait()
    # a shared machine may be busy anyway, so only the lower bound is checked
    assert busy >= 0.3 / (os.cpu_count() or 1)


def test_export_bench_reports_time_memory_and_copy(tiny_hf_checkpoint, tmp_path, capsys):
    import json as _json

    from llama2_onnx.benchmarks import export_bench

    out = tmp_path / "rows.jsonl"
    assert export_bench.main([str(tiny_hf_checkpoint), "--precision", "fp32", "--json", str(out)]) == 0
    row = _json.loads(out.read_text())
    assert row["export_seconds"] > 0 and row["copy_seconds"] >= 0 and row["peak_rss_bytes"] > 50e6
    assert row["onnx_bytes"] > 0 and "write" in row["stages"]
    assert not any(p.name.startswith(".export-bench-") for p in tiny_hf_checkpoint.parent.iterdir())  # scratch removed
    assert export_bench.main([str(tmp_path / "missing")]) == 2
    assert "make_checkpoint" in capsys.readouterr().err


def test_llama_cpp_peer_runs_the_source_gguf_at_batch_one():
    from llama2_onnx.benchmarks.job import Job
    from llama2_onnx.benchmarks.peers import PEERS, PRECISION_OF, skip_reason

    peer = PEERS["llama.cpp"]
    job = Job(system="llama.cpp", model_dir="m", prompt_ids=[1], new_tokens=2, checkpoint=__file__, checkpoint_format="hf")
    why = skip_reason(peer, job)
    assert "llama_cpp is not installed" in why or "gguf" in why
    if "gguf" in why:  # installed: refuses a batch and a checkpoint that is not a GGUF
        assert "batch" in skip_reason(peer, Job(**{**job.__dict__, "checkpoint_format": "gguf", "batch": 2}))
    assert PRECISION_OF[peer.weights]("fp32", "int4", "cpu") == "gguf"
