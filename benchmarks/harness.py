"""run_benchmark: every configuration x every system, timed, summarised into result rows.

A configuration is one point of the sweep (prompt length, new tokens, batch, threads).
For each, "ours" runs once per I/O-binding mode and then each asked-for peer runs on the
same prompt ids, new-token count and thread count, greedy, end-of-sequence suppressed.
Each system runs in its own process (worker.py); by default all are loaded at once and
take turns round by round (schedule.py). Warm-up rounds come first and are not counted;
rows report the median, min and max over the repeats (stats.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from llama2_onnx.errors import UserError

from . import report, schedule, stats
from .job import Job, folder_weight_bytes
from .machine import load_average, machine_info, read_bandwidth
from .peers import PEERS, PRECISION_OF, skip_reason
from .prompts import prompt_ids

SWEEPABLE = {"prompt-len": "prompt_len", "new-tokens": "new_tokens", "batch": "batch", "threads": "threads"}
IO_BINDING_MODES = {"on": (True,), "off": (False,), "both": (True, False)}
HUGE_PAGES_MODES = IO_BINDING_MODES  # ours with the weights in 2 MB pages: on, off or both
PEER_CHOICES = tuple(p for p in PEERS if p != "ours")

# Every row has exactly these keys (None where a figure does not apply or was not measured).
ROW_FIELDS = (
    "system", "label", "status", "note", "detail",
    "cpu_model", "cores", "ort_version", "provider", "precision",
    "io_binding", "huge_pages", "threads", "batch", "prompt_len", "new_tokens", "repeats", "warmup",
    "ttft_ms", "decode_ms_per_token", "decode_tokens", "decode_s", "decode_tokens_per_s",
    "e2e_tokens", "e2e_s", "e2e_tokens_per_s", "decode_vs_ours",
    "weight_bytes", "bandwidth_gb_s", "bandwidth_share",
    "peak_rss_mb", "baseline_rss_mb", "device_memory_mb", "memory_isolated", "load_s", "foreign_cpu", "reruns",
    "tokens_match", "match_prefix", "tokens",
)


@dataclass(frozen=True)
class Point:
    prompt_len: int
    new_tokens: int
    batch: int
    threads: int


def parse_sweep(specs: list[str]) -> dict[str, list[int]]:
    """["prompt-len=16,128,512"] -> {"prompt_len": [16, 128, 512]}."""
    sweep: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or name not in SWEEPABLE:
            raise UserError(f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}")
        try:
            sweep[SWEEPABLE[name]] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--sweep {spec!r}: the values must be integers") from None
        if not sweep[SWEEPABLE[name]]:
            raise UserError(f"--sweep {spec!r}: give at least one value")
    return sweep


def points(base: Point, sweep: dict[str, list[int]]) -> list[Point]:
    names = list(sweep)
    return [replace(base, **dict(zip(names, combo))) for combo in itertools.product(*(sweep[n] for n in names))]


def _check(pts: list[Point], repeats: int, warmup: int, peers: list[str], io_binding: str, max_seq_len: int,
           interleave: str, huge_pages: str) -> None:
    if interleave not in schedule.INTERLEAVE:
        raise UserError(f"--interleave must be one of {', '.join(schedule.INTERLEAVE)}, got {interleave!r}")
    if repeats < 1 or warmup < 0:
        raise UserError(f"--repeats must be at least 1 and --warmup at least 0 (got {repeats}, {warmup})")
    if io_binding not in IO_BINDING_MODES:
        raise UserError(f"--io-binding must be one of {', '.join(IO_BINDING_MODES)}, got {io_binding!r}")
    if huge_pages not in HUGE_PAGES_MODES:
        raise UserError(f"--huge-pages must be one of {', '.join(HUGE_PAGES_MODES)}, got {huge_pages!r}")
    unknown = [p for p in peers if p not in PEER_CHOICES]
    if unknown:
        raise UserError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEER_CHOICES)}")
    for p in pts:
        if p.new_tokens < 2 or p.prompt_len < 1 or p.batch < 1 or p.threads < 1:
            raise UserError(f"need new tokens >= 2 (one prompt pass + decode steps), prompt length, batch and "
                            f"threads >= 1; got {p}")
        if p.prompt_len + p.new_tokens > max_seq_len:
            raise UserError(f"prompt {p.prompt_len} + new tokens {p.new_tokens} exceed the model's context "
                            f"of {max_seq_len} tokens")


def sniff_format(path: Path) -> str | None:
    """meta, hf or gguf, from the files alone (torch-free)."""
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else None
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    return "gguf" if any(path.glob("*.gguf")) else None


def run_benchmark(*, model: str | Path, prompt_len: int = 128, new_tokens: int = 128, batch: int = 1,
                  io_binding: str = "both", huge_pages: str = "on", provider: str = "auto",
                  threads: int | None = None, repeats: int = 5,
                  warmup: int = 1, peers: list[str] = (), sweep: dict[str, list[int]] | None = None,
                  checkpoint: str | Path | None = None, builder_precision: str | None = None,
                  isolate: bool = True, interleave: str = "auto", bandwidth_mb: int = 256,
                  timeout_s: float | None = None, noise_limit: float = 0.15, retries: int = 2,
                  startup: bool | str = False, log: Callable[[str], None] = print) -> dict:
    """Benchmark the model folder (and peers). Returns {"schema", "machine", "rows"}, and with startup
    (CPU) "startup": ours started three times in fresh processes (benchmarks/startup.py), five with
    startup="cold" (two after dropping the page cache)."""
    from llama2_onnx.runtime.folder import check_folder
    from llama2_onnx.runtime.providers import physical_cores, resolve

    folder = Path(model)
    cfg = check_folder(folder)  # peers open the folder with their own sessions: check it as ours would
    a = cfg.model
    peers = list(dict.fromkeys(peers))
    pts = points(Point(prompt_len, new_tokens, batch, threads or physical_cores()), sweep or {})
    _check(pts, repeats, warmup, peers, io_binding, a.max_seq_len, interleave, huge_pages)
    prov = resolve(provider).name

    machine = machine_info(prov)
    machine["read_bandwidth"] = bw = read_bandwidth(max(p.threads for p in pts), mb=bandwidth_mb)
    log(f"machine: {machine['cpu_model']}, {machine['physical_cores']} cores, onnxruntime {machine['ort_version']}, "
        f"provider {prov}; read bandwidth {bw['best']} GB/s with {bw['threads']} threads "
        f"(NumPy {bw['numpy']}, ORT MatMul {bw['ort']})")

    ckpt = Path(checkpoint) if checkpoint else (Path(cfg.source["path"]) if cfg.source.get("path") else None)
    ckpt_format = sniff_format(ckpt) if checkpoint and ckpt.exists() else cfg.source.get("format")
    base = Job(system="ours", model_dir=str(folder), prompt_ids=[], new_tokens=new_tokens, provider=prov,
               precision=cfg.precision, repeats=repeats, warmup=warmup, eos_ids=list(a.eos_ids),
               checkpoint=str(ckpt) if ckpt else None, checkpoint_format=ckpt_format)
    builder_precision = builder_precision or cfg.precision
    peer_dirs = _prepare_peers(peers, base, builder_precision, log)
    systems = [("ours", io, hp) for io in IO_BINDING_MODES[io_binding] for hp in HUGE_PAGES_MODES[huge_pages]]
    systems += [(name, None, None) for name in peers]
    memory = [PEERS[s].memory for s, _, _ in systems]
    together = schedule.should_interleave(interleave, memory, folder_weight_bytes(folder), log)
    machine["interleaved"] = together

    rows: list[dict] = []
    first_ids = None  # the first configuration's prompt: what the start-up runs are timed with
    for p in pts:
        ids = prompt_ids(folder, length=p.prompt_len, add_bos=cfg.add_bos, bos_id=a.bos_id, eos_id=a.eos_id,
                         vocab_size=a.vocab_size, tokenizer=cfg.tokenizer)
        first_ids = first_ids or ids
        jobs = [replace(base, system=system, io_binding=io, huge_pages=hp, prompt_ids=ids, new_tokens=p.new_tokens,
                        batch=p.batch, threads=p.threads, peer_dir=peer_dirs.get(system),
                        precision=PRECISION_OF[PEERS[system].weights](cfg.precision, builder_precision, prov))
                for system, io, hp in systems]
        skipped = [peer_dirs.get(j.system + ":skip") or skip_reason(PEERS[j.system], j) for j in jobs]
        runnable = [j for j, why in zip(jobs, skipped) if not why]
        measured = iter(schedule.measure(runnable, warmup=warmup, repeats=repeats, interleave=together,
                                         isolate=isolate, timeout_s=timeout_s, noise_limit=noise_limit,
                                         retries=retries, log=log))
        reference = None
        for job, why in zip(jobs, skipped):
            row = make_row(job, {"skipped": why} if why else next(measured), machine, isolated=isolate)
            if job.system == "ours" and reference is None and row["status"] == "ok":
                reference = row
            _compare(row, reference)
            rows.append(row)
            log(_progress_line(row))
    _probe_again(machine, rows, bandwidth_mb)
    result = {"schema": 1, "machine": machine, "rows": rows}
    if startup and prov == "cpu":
        from .startup import measure_startup

        result["startup"] = starts = measure_startup(str(folder), pts[0].threads, first_ids, timeout_s or 600,
                                                          cold=startup == "cold")
        for line in report.startup_lines(result):
            log(f"{line} (prompt {len(first_ids)})")
    return result


def _probe_again(machine: dict, rows: list[dict], mb: int) -> None:
    """Measure read bandwidth again after the runs and keep the best of both probes: a probe
    that met a busy moment understates the machine (and overstates every share)."""
    first = machine["read_bandwidth"]
    again = read_bandwidth(first["threads"], mb=mb)
    best = {k: max(v for v in (first[k], again[k]) if v is not None) if (first[k] or again[k]) else None
            for k in ("numpy", "ort", "best")}
    machine["read_bandwidth"] = {**first, **best, "probes": 2}
    machine["load_average_end"] = load_average()
    for row in rows:
        if row["bandwidth_gb_s"] is not None and best["best"]:
            row["bandwidth_share"] = round(row["bandwidth_gb_s"] / best["best"], 3)


def _prepare_peers(peers: list[str], base: Job, precision: str, log) -> dict[str, str]:
    """Build what a peer needs before the timed runs (genai-builder's model). "<peer>:skip" holds a failure."""
    out: dict[str, str] = {}
    if "genai-builder" in peers and skip_reason(PEERS["genai-builder"], base) is None:
        from . import builder

        try:
            out["genai-builder"] = str(builder.build(checkpoint=base.checkpoint, checkpoint_format=base.checkpoint_format,
                                                     model_dir=base.model_dir, precision=precision,
                                                     provider=base.provider, log=log))
        except Exception as e:  # report it in the row, keep benchmarking the others
            out["genai-builder:skip"] = f"its builder failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return out


def make_row(job: Job, result: dict, machine: dict, isolated: bool = True) -> dict:
    """One JSON row from a job and its worker result ({"skipped"}, {"error"} or the measurements)."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update(system=job.system, label=job.label, cpu_model=machine["cpu_model"], cores=machine["physical_cores"],
               ort_version=machine["ort_version"], provider=job.provider, precision=job.precision,
               io_binding=job.io_binding, huge_pages=job.huge_pages, threads=job.threads, batch=job.batch,
               prompt_len=job.prompt_len, new_tokens=job.new_tokens, repeats=job.repeats, warmup=job.warmup)
    if "skipped" in result or "error" in result:
        row.update(status="skipped" if "skipped" in result else "failed", note=result.get("skipped") or result["error"])
        return row
    traces = [stats.Trace.from_dict(t) for t in result["traces"]]
    row.update(stats.summarize(traces, batch=job.batch, new_tokens=job.new_tokens))
    weight_bytes = result.get("weight_bytes") or folder_weight_bytes(job.model_dir)
    achieved, share = stats.bandwidth(weight_bytes, row["decode_tokens_per_s"]["median"], job.batch,
                                      machine["read_bandwidth"]["best"])
    row.update(status="ok", detail=result.get("detail"), weight_bytes=weight_bytes, bandwidth_gb_s=achieved,
               bandwidth_share=share, peak_rss_mb=result.get("peak_rss_mb"), baseline_rss_mb=result.get("baseline_rss_mb"),
               device_memory_mb=result.get("device_memory_mb"), memory_isolated=isolated, load_s=result.get("load_s"),
               reruns=result.get("reruns", 0), tokens=traces[0].tokens)
    return row


def _compare(row: dict, reference: dict | None) -> None:
    if row["status"] != "ok" or reference is None:
        return
    row["tokens_match"], row["match_prefix"] = stats.match(reference["tokens"], row["tokens"])
    ours, theirs = reference["decode_tokens_per_s"]["median"], row["decode_tokens_per_s"]["median"]
    row["decode_vs_ours"] = round(theirs / ours, 3) if ours and theirs else None


def _progress_line(row: dict) -> str:
    head = f"{row['label']:<24} P={row['prompt_len']} N={row['new_tokens']} B={row['batch']} T={row['threads']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}, {row['note']}"
    noise = f", others took up to {row['foreign_cpu']['max']:.0%} of the CPU" if row["foreign_cpu"] else ""
    return (f"{head}: TTFT {row['ttft_ms']['median']:.1f} ms, decode {row['decode_tokens_per_s']['median']:.1f} tok/s, "
            f"peak RSS {row['peak_rss_mb']} MB{noise}")
