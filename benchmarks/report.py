"""Benchmark output: a plain terminal table, the JSON file, and a PNG plot (with matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# column title -> how to show a row (an ok row; skipped/failed rows print their note instead)
COLUMNS: dict[str, callable] = {
    "system": lambda r: r["label"],
    "prec": lambda r: r["precision"],
    "prompt": lambda r: str(r["prompt_len"]),
    "new": lambda r: str(r["new_tokens"]),
    "batch": lambda r: str(r["batch"]),
    "thr": lambda r: str(r["threads"]),
    "TTFT ms [min-max]": lambda r: _spread(r["ttft_ms"], ".1f"),
    "ms/tok med p90": lambda r: f"{r['decode_ms_per_token']['median']:.2f} {r['decode_ms_per_token']['p90']:.2f}",
    "decode tok/s [min-max]": lambda r: _spread(r["decode_tokens_per_s"], ".1f"),
    "e2e tok/s": lambda r: f"{r['e2e_tokens_per_s']['median']:.1f}",
    "x ours": lambda r: "" if r["decode_vs_ours"] is None else f"{r['decode_vs_ours']:.2f}",
    "GB/s (of max)": lambda r: _bandwidth(r),
    "peak RSS MB": lambda r: f"{r['peak_rss_mb']:.0f}" + ("" if r["device_memory_mb"] is None else f" +{r['device_memory_mb']:.0f} dev"),
    "match": lambda r: {True: "yes", False: f"no@{r['match_prefix']}", None: "-"}[r["tokens_match"]],
    "noise max": lambda r: _noise(r),
}


def _noise(r: dict) -> str:
    """The most CPU other processes took during a counted repeat, and how many repeats were rerun."""
    f = r["foreign_cpu"]
    text = "-" if f is None else f"{f['max']:.0%}"
    return text + (f" ({r['reruns']} rerun)" if r["reruns"] else "")


def _spread(s: dict, fmt: str) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def _bandwidth(r: dict) -> str:
    if r["bandwidth_gb_s"] is None:
        return "-"
    share = f" ({r['bandwidth_share']:.0%})" if r["bandwidth_share"] is not None else ""
    return f"{r['bandwidth_gb_s']:.1f}{share}"


def format_table(result: dict) -> str:
    """The rows as an aligned plain-text table, machine line first, notes for skipped systems last."""
    m = result["machine"]
    bw = m.get("read_bandwidth", {})
    lines = [f"{m['cpu_model']} | {m['physical_cores']} cores | onnxruntime {m['ort_version']} | provider {m['provider']} | "
             f"read bandwidth {bw.get('best')} GB/s ({bw.get('threads')} threads)"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    if ok:
        cells = [list(COLUMNS)] + [[show(r) for show in COLUMNS.values()] for r in ok]
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        for k, row in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']}: {r['status']} ({r['note']})")
    lines += startup_lines(result)
    return "\n".join(lines)


def startup_lines(result: dict) -> list[str]:
    """One line per start of ours (benchmarks/startup.py), and the first start over the second."""
    starts = result.get("startup") or {}
    lines = [f"start {name}: " + (s["error"] if "error" in s else
             f"{s['start_s']:.2f} s (from_dir {s['from_dir_s']:.2f} s + first token {s['first_token_ms']:.0f} ms)")
             for name, s in starts.items()]
    first, second = starts.get("first", {}), starts.get("second", {})
    if first.get("start_s") and second.get("start_s"):
        lines.append(f"second start {first['start_s'] / second['start_s']:.2f}x faster than the first"
                     + (f", {starts['off']['start_s'] / second['start_s']:.2f}x than a start without the cache"
                        if starts.get("off", {}).get("start_s") else ""))
    cold_off, cold_second = starts.get("cold-off", {}), starts.get("cold-second", {})
    if cold_off.get("start_s") and cold_second.get("start_s"):
        lines.append(f"from a dropped page cache: the second start {cold_off['start_s'] / cold_second['start_s']:.2f}x "
                     "faster than a start without the cache")
    return lines


def format_markdown(result: dict) -> str:
    """The ok rows as a Markdown table (for BENCHMARKS.md), skipped systems as a list below."""
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(show(r) for show in COLUMNS.values()) + " |" for r in ok]
    lines += [f"- {r['label']}: {r['status']} ({r['note']})" for r in result["rows"] if r["status"] != "ok"]
    lines += ["", *(f"- {line}" for line in startup_lines(result))] if result.get("startup") else []
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    text = json.dumps(result, indent=1)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(path).write_text(text + "\n")


# ---- plot ------------------------------------------------------------------------------

def _series_key(row: dict, varying: list[str]) -> str:
    extra = " ".join(f"{k}={row[k]}" for k in varying)
    return f"{row['label']} {extra}".strip()


def plot(result: dict, path: str) -> str | None:
    """Write the PNG; return None, or a one-line note why not (matplotlib missing, nothing to plot).

    Left: decode (solid) and end-to-end (dashed) tokens/s against prompt length, a line per
    system. Right: ours with I/O binding on vs off, decode tokens/s per prompt length.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return "no successful rows: no plot written"
    varying = [k for k in ("new_tokens", "batch", "threads") if len({r[k] for r in rows}) > 1]
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_series_key(r, varying), []).append(r)

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for k, (name, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["prompt_len"])
        x = [r["prompt_len"] for r in rs]
        color = f"C{k % 10}"
        left.plot(x, [r["decode_tokens_per_s"]["median"] for r in rs], "o-", color=color, label=f"{name} decode")
        left.plot(x, [r["e2e_tokens_per_s"]["median"] for r in rs], "s--", color=color, alpha=0.6, label=f"{name} end-to-end")
    left.set_xlabel("prompt length (tokens)")
    left.set_ylabel("tokens/s (median)")
    left.set_title("tokens/s vs prompt length")
    left.set_ylim(bottom=0)
    all_lens = sorted({r["prompt_len"] for r in rows})
    if len(all_lens) > 1:
        left.set_xscale("log", base=2)
    left.set_xticks(all_lens, [str(n) for n in all_lens])
    left.legend(fontsize=7)
    left.grid(alpha=0.3)

    ours = [r for r in rows if r["system"] == "ours"]
    lens = sorted({r["prompt_len"] for r in ours})
    width = 0.38
    for j, (mode, text) in enumerate(((True, "I/O binding on"), (False, "I/O binding off"))):
        vals = [next((r["decode_tokens_per_s"]["median"] for r in ours if r["prompt_len"] == n and r["io_binding"] is mode), 0)
                for n in lens]
        right.bar([i + (j - 0.5) * width for i in range(len(lens))], vals, width, label=text)
    right.set_xticks(range(len(lens)), [str(n) for n in lens])
    right.set_xlabel("prompt length (tokens)")
    right.set_ylabel("decode tokens/s (median)")
    right.set_title("ours: I/O binding on vs off")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")

    m = result["machine"]
    fig.suptitle(f"{m['cpu_model']}, {m['physical_cores']} cores, onnxruntime {m['ort_version']}, {m['provider']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
