"""report: results.csv, summary.json and report.md (and, through chart.py, benchmark.png) from
saved result.json files.

A pure function of the files: `ampcompare report DIR` on a compare folder rebuilds the same
report.md that compare wrote, and several folders (e.g. two machines) report side by side,
grouped by device.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import statistics

from ampcompare import chart
from ampcompare.chart import MIB
from common import results
from common.precision import CANONICAL

METRICS = ("median_epoch_time_s", "images_per_s", "peak_memory_bytes", "final_test_acc")
CSV_COLUMNS = ("device_name", "device", "impl", "precision", "opt_level", "repeat", "status",
               "error", *METRICS, "epochs_done", "weights_sha256", "run_id", "path")


def load(folders) -> list[dict]:
    records = []
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "**", "result.json"), recursive=True)):
            with open(path) as f:
                record = json.load(f)
            record["_path"] = os.path.relpath(path, folder)
            records.append(record)
    return records


def device_of(record) -> str:
    env = record.get("env") or {}
    return f"{env.get('device_name', '?')} ({env.get('device', '?')})"


def precision_of(record) -> str:
    p = record["precision"]
    return p.get("effective") or p.get("requested")


def rows(records) -> list[dict]:
    out = []
    for r in records:
        s = r.get("summary") or {}
        out.append({"device_name": (r.get("env") or {}).get("device_name"),
                    "device": (r.get("env") or {}).get("device"), "impl": r["impl"],
                    "precision": precision_of(r), "opt_level": r.get("opt_level"),
                    "repeat": r.get("repeat"), "status": r["status"], "error": r.get("error"),
                    **{m: s.get(m) for m in METRICS}, "epochs_done": s.get("epochs_done", 0),
                    "weights_sha256": r.get("weights_sha256"), "run_id": r["run_id"],
                    "path": r.get("_path")})
    return out


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _order(names, canonical=()):
    return sorted(set(names), key=lambda n: (list(canonical).index(n) if n in canonical
                                             else len(canonical), n))


def summarize(records) -> dict:
    devices = {}
    for r in records:
        devices.setdefault(device_of(r), []).append(r)
    out = []
    for device, recs in devices.items():
        ok = [r for r in recs if r["status"] == "ok"]
        env = (ok or recs)[0].get("env") or {}
        groups = {}
        for r in recs:
            groups.setdefault(precision_of(r), {}).setdefault(r["impl"], []).append(r)
        table = {}
        for precision in _order(groups, CANONICAL):
            table[precision] = {}
            for impl in _order(groups[precision], ("plain", "lightning", "apex")):
                runs = groups[precision][impl]
                good = [r["summary"] for r in runs if r["status"] == "ok"]
                table[precision][impl] = {
                    "runs": len(runs), "ok": len(good),
                    "opt_level": runs[0].get("opt_level"),
                    **{m: _spread([s.get(m) for s in good]) for m in METRICS}}
        out.append({"device": device, "env": env, "config": (ok or recs)[0].get("config", {}),
                    "precisions": table, "ratios": _ratios(table)})
    return {"schema": results.SCHEMA, "devices": out}


def _ratios(table) -> dict:
    """Mixed precision against 32-true per impl: speed-up (time ratio) and memory ratio."""
    base = table.get("32-true", {})
    ratios = {}
    for precision, impls in table.items():
        if precision == "32-true":
            continue
        for impl, cell in impls.items():
            ref = base.get(impl)
            if not ref or not ref["median_epoch_time_s"] or not cell["median_epoch_time_s"]:
                continue
            ratios.setdefault(impl, {})[precision] = {
                "speedup": ref["median_epoch_time_s"]["median"] / cell["median_epoch_time_s"]["median"],
                "memory": cell["peak_memory_bytes"]["median"] / ref["peak_memory_bytes"]["median"],
                "accuracy_change": cell["final_test_acc"]["median"] - ref["final_test_acc"]["median"],
            }
    return ratios


def _cell(spread, scale=1.0, fmt="{:.2f}"):
    if not spread:
        return "–"
    med, lo, hi = (spread[k] / scale for k in ("median", "min", "max"))
    if spread["n"] == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(lo)}–{fmt.format(hi)}]"


def markdown(summary, records) -> str:
    lines = ["# ampcompare report", ""]
    for dev in summary["devices"]:
        env, cfg = dev["env"], dev["config"]
        lines += [f"## {dev['device']}", ""]
        lines += ["| environment | |", "|---|---|"]
        for key in ("device_name", "cuda_capability", "tensor_cores", "cpu_model", "threads",
                    "tf32", "cudnn_benchmark", "channels_last", "deterministic", "torch",
                    "torchvision", "lightning", "apex", "python", "git_commit"):
            lines.append(f"| {key} | {env.get(key, '–')} |")
        lines += ["", f"Model `{cfg.get('model')}` on `{cfg.get('dataset')}`, batch "
                  f"{cfg.get('batch_size')}, {cfg.get('optimizer')} at lr {cfg.get('lr')}, "
                  f"epochs: {cfg.get('epochs')}. Median over repeats, [min–max] when more than one; "
                  f"epoch times exclude the first (warm-up) epoch of runs that have more.", ""]
        if env.get("device") == "cpu":
            lines += ["On CPU the mixed precision is bf16-mixed: fp16 has no fast CPU kernels. "
                      "Peak memory on CPU is the process's peak RSS, not an allocator peak.", ""]
        for precision, impls in dev["precisions"].items():
            lines += [f"### {precision}", "",
                      "| impl | runs ok | epoch time (s) | images/s | peak memory (MiB) | final test acc |",
                      "|---|---|---|---|---|---|"]
            for impl, c in impls.items():
                name = f"{impl} ({c['opt_level']})" if c.get("opt_level") else impl
                lines.append(f"| {name} | {c['ok']}/{c['runs']} | {_cell(c['median_epoch_time_s'])} "
                             f"| {_cell(c['images_per_s'], fmt='{:.0f}')} "
                             f"| {_cell(c['peak_memory_bytes'], MIB, '{:.0f}')} "
                             f"| {_cell(c['final_test_acc'], fmt='{:.4f}')} |")
            lines.append("")
        if dev["ratios"]:
            lines += ["### Mixed precision against 32-true", "",
                      "| impl | precision | speed-up (32-true time / mixed time) | memory (mixed / 32-true) | accuracy change |",
                      "|---|---|---|---|---|"]
            for impl, per in dev["ratios"].items():
                for precision, r in per.items():
                    lines.append(f"| {impl} | {precision} | {r['speedup']:.2f}× | {r['memory']:.2f}× "
                                 f"| {r['accuracy_change']:+.4f} |")
            lines.append("")
    failed = {}
    for r in records:
        if r["status"] != "ok":
            key = (device_of(r), r["impl"], precision_of(r), r["status"], r.get("error") or "")
            failed.setdefault(key, []).append(r["run_id"])
    if failed:
        lines += ["## Runs that did not finish", "",
                  "| device | impl | precision | runs | status | why |", "|---|---|---|---|---|---|"]
        for (device, impl, precision, status, why), run_ids in failed.items():
            why = why.replace("|", "\\|")
            lines.append(f"| {device} | {impl} | {precision} | {', '.join(run_ids)} | {status} "
                         f"| {why} |")
        lines.append("")
    return "\n".join(lines)


def write(records, out_dir: str) -> dict:
    """Write the four report files into out_dir; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(records)
    paths = {name: os.path.join(out_dir, name)
             for name in ("results.csv", "summary.json", "report.md", "benchmark.png")}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows(records))
    with open(paths["results.csv"], "w", newline="") as f:
        f.write(buf.getvalue())
    results.write_json(paths["summary.json"], summary)
    with open(paths["report.md"], "w") as f:
        f.write(markdown(summary, records))
    chart.write(summary, paths["benchmark.png"])
    return paths
