"""Markdown for bench/corpus.py: one table per model, a summary against the issue's targets."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from pathlib import Path

ORT = ("ort-dynamic", "ort-static")
FASTER = 0.9  # a batch-1 latency ratio that counts as faster (±10 % is noise on a shared machine)


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def exit_text(row: dict) -> str:
    if "exit" not in row:
        return "–"
    if row.get("timeout"):
        return "timeout"
    code = row["exit"]
    if code == 0 and row.get("gate") and not row["gate"].get("passed", True):
        return "3 (gate; --force)"
    return str(code)


def skipped_text(row: dict) -> str:
    skipped = row.get("skipped") or []
    if not skipped:
        return ""
    whys = Counter(_short_reason(w) for _, _, w in skipped)
    top, n = whys.most_common(1)[0]
    return f"{len(skipped)} ({n}× {top})"


def _short_reason(why: str) -> str:
    return why.split(";")[0].split(" (")[0][:70]


def good_int8(row: dict) -> bool:
    """The issue's bar: cosine >= 0.99 and (faster at batch 1 or <= 0.5x size). Faster means a
    batch-1 latency ratio <= 0.9: within ±10 % is noise on a shared machine, not a win."""
    if not row.get("loads") or row.get("cos") is None:
        return False
    fast = row.get("latency_ratio") is not None and row["latency_ratio"] <= FASTER
    return row["cos"] >= 0.99 and (fast or row.get("size_ratio", 9) <= 0.5)


def write_markdown(path: Path, results: dict, entries: dict, names: list[str], args, wall: float) -> None:
    lines = ["# Corpus: every recipe on third-party ONNX models", "",
             f"`python bench/corpus.py{_args_text(args)}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{wall / 60:.0f} min{' (sum of the per-model runs, table rebuilt from their saved rows)' if getattr(args, 'report_only', False) else ''}. CPU: {_cpu()}; {os.cpu_count()} cores, shared with other jobs (latency ratios "
             f"are paired medians, 1 intra-op thread, every variant interleaved round by round in one process; "
             f"treat ±10 % as noise). onnxruntime {_version('onnxruntime')}, onnx {_version('onnx')}.", "",
             "Columns: **exit** of `onnxcomp run … --force` (`3 (gate; --force)`: the recipe's gate failed, the "
             "model was written anyway to measure it); **ok** = file written / passes the ONNX checker / "
             "onnxruntime loads and runs it; **cos** / **agree**: fidelity of the model's main output vs fp32 on "
             "the real val data (per-sample cosine; for probability outputs of < 4 values the cosine over the "
             "whole set; agree = top-1 over the last axis, or p > 0.5 for a single probability); **size×**, "
             "**bs1×** = file size and batch-1 latency over fp32; **int8 / float** = int8 kernels onnxruntime "
             "runs / float ops reading dequantized tensors (onnxcomp.fusion); **skipped** = layers a pass left "
             "alone (count, most common reason); **s**, **MB** = wall time and peak RSS of the whole run "
             "(onnxcomp: load + passes + validation on val; ORT: pre-process + quantize).", ""]
    for rows in results.values():  # size ratios first: the summary's target reads them
        fp = rows.get("fp32", {})
        for r in rows.values():
            if "size" in r and fp.get("size"):
                r["size_ratio"] = r["size"] / fp["size"]
    lines += summary(results, names)
    for model_id, rows in results.items():
        e = entries[model_id]
        fp = rows.get("fp32", {})
        lines += ["", f"## {model_id} — `{e['package']}` `{e['member'].split('/')[-1]}`", "",
                  f"{e['exporter']}; covers: {', '.join(e['covers'])}. fp32 {fp.get('size', 0) / 1e6:.2f} MB, "
                  f"bs1 {_f(fp.get('latency_ms'), '{:.2f}')} ms. Output compared: `{e['output']}`.", "",
                  "| row | exit | ok | cos | agree | size× | bs1× | int8 / float | skipped | s | MB | message |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in [*names, *ORT]:
            if name not in rows:
                continue
            r = rows[name]
            ok = "/".join("y" if r.get(k) else "n" for k in ("written", "valid", "loads")) if r.get("written") else "n"
            msg = r.get("message", "") if not r.get("written") or r.get("exit") else "; ".join(r.get("notes", [])[:1])
            k = f"{r['int8_kernels']} / {r['float_between_qdq']}" if "int8_kernels" in r else ""
            lines.append(f"| {name} | {exit_text(r)} | {ok} | {_f(r.get('cos'), '{:.4f}')} | {_f(r.get('agree'))} | "
                         f"{_f(r.get('size_ratio'), '{:.2f}')} | {_f(r.get('latency_ratio'), '{:.2f}')} | {k} | "
                         f"{skipped_text(r)} | {_f(r.get('wall_s'), '{:.0f}')} | {_f(r.get('peak_mb'), '{:.0f}')} | "
                         f"{_cell(msg)} |")
        reasons = skip_details(rows, names)
        if reasons:
            lines += ["", "<details><summary>skipped layers and notes</summary>", ""] + reasons + ["", "</details>"]
    path.write_text("\n".join(lines) + "\n")


def summary(results: dict, names: list[str]) -> list[str]:
    lines = ["## Summary", "", "| row | exit 0 | gate failed (3) | exit 2 | exit 1 | invalid or unloadable file | "
             "cos ≥ 0.99 and (bs1× ≤ 0.9 or size× ≤ 0.5) |", "|---|---|---|---|---|---|---|"]
    for name in [*names, *ORT]:
        rows = [r[name] for r in results.values() if name in r]
        if not rows:
            continue
        codes = Counter(exit_text(r).split(" ")[0] for r in rows)
        bad = sum(1 for r in rows if r.get("written") and not (r.get("valid") and r.get("loads")))
        good = sum(good_int8(r) for r in rows)
        lines.append(f"| {name} | {codes.get('0', 0)} | {codes.get('3', 0)} | {codes.get('2', 0)} | "
                     f"{codes.get('1', 0) + codes.get('timeout', 0)} | {bad} | {good} / {len(rows)} |")
    if "int8" in names:
        lines += ["", "int8 per model beside onnxruntime.quantization (cells: cosine · size× · bs1×; **bar** = cos ≥ "
                  "0.99 and (bs1× ≤ 0.9 or size× ≤ 0.5); **≥ ORT** = int8 cosine at least the better of ORT's two "
                  "that quantized something):", "",
                  "| model | int8 | bar | int8-dynamic | ORT dynamic | ORT static | int8 ≥ ORT |", "|---|---|---|---|---|---|---|"]
        for model_id, rows in results.items():
            ours = rows.get("int8", {}).get("cos") if rows.get("int8", {}).get("loads") else None
            peers = [rows.get(k, {}).get("cos") if rows.get(k, {}).get("loads") else None for k in ORT]
            # a peer file with no int8 kernel quantized nothing: not a quantized model to compare with
            real = [p for p, k in zip(peers, ORT) if p is not None and rows[k].get("int8_kernels", 1) > 0]
            best = max(real, default=None)
            if ours is None or best is None:
                verdict = "– (ORT quantized nothing)" if ours is not None and any(p is not None for p in peers) else "–"
            else:
                verdict = "yes" if ours >= best - 1e-4 else f"**no** ({ours - best:+.4f})"
            bar = "yes" if good_int8(rows.get("int8", {})) else "**no**"
            cells = [_triple(rows.get(k)) for k in ("int8", "int8-dynamic", *ORT)]
            lines.append(f"| {model_id} | {cells[0]} | {bar} | {' | '.join(cells[1:])} | {verdict} |")
    return lines


def _triple(row: dict | None) -> str:
    """cosine · size× · bs1× of one row, or what went wrong."""
    if not row:
        return "–"
    if not row.get("written"):
        return "timeout" if row.get("timeout") else f"exit {row.get('exit')}, no file"
    if not row.get("loads"):
        return "file does not load"
    cell = f"{_f(row.get('cos'), '{:.4f}')} · {_f(row.get('size_ratio'), '{:.2f}')} · {_f(row.get('latency_ratio'), '{:.2f}')}"
    return cell + ("" if row.get("valid") else " (fails the ONNX checker)")


def skip_details(rows: dict, names: list[str]) -> list[str]:
    out = []
    for name in [*names, *ORT]:
        r = rows.get(name, {})
        groups = Counter((p, why) for p, _, why in r.get("skipped") or [])
        notes = r.get("notes") or []
        if not groups and not notes:
            continue
        out.append(f"- **{name}**: " + "; ".join(f"{p}: {n}× {_cell(why)}" for (p, why), n in groups.most_common(8))
                   + ("; notes: " + " / ".join(_cell(n) for n in notes[:4]) if notes else ""))
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:260]


def _args_text(args) -> str:
    parts = []
    for flag in ("models", "recipes"):
        if getattr(args, flag):
            parts.append(f" --{flag} {getattr(args, flag)}")
    if args.no_latency:
        parts.append(" --no-latency")
    if args.no_ort:
        parts.append(" --no-ort")
    return "".join(parts)


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags"))
        keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
        return f"{model} ({', '.join(keep)})"
    except (OSError, StopIteration):
        return platform.processor() or "?"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"
