"""report: results.csv, summary.json and report.md (and, through chart.py, benchmark.png) from
saved result.json files.

A pure function of the files: `ampcompare report DIR` on a compare folder rebuilds the same
report.md that compare wrote, and several folders (e.g. two machines) report side by side,
grouped by device and by settings: runs are only ever summarised together when everything that
changes what is computed or how fast (model, data, batch, optimizer, epochs, switches) is equal.
Repeats and seeds of the same settings are what the medians and [min–max] spreads run over.
A file that is not a run record is skipped, and named.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import statistics

from ampcompare import chart, explain
from ampcompare.chart import MIB
from common import results
from common.config import Config
from common.precision import CANONICAL

METRICS = ("median_epoch_time_s", "images_per_s", "achieved_tflops", "mfu",
           "data_wait_fraction", "activation_bytes", "peak_memory_bytes",
           "peak_beyond_data_bytes", "skipped_steps",
           "loss_scale_first", "loss_scale_last", "final_test_acc")
CSV_COLUMNS = ("device_name", "device", "impl", "precision", "opt_level", "seed", "repeat",
               "status", "error", *METRICS, "epochs_done", "weights_sha256", "run_id", "path")
IMPL_ORDER = ("plain", "lightning", "fabric", "apex", "apex (O0)", "apex (O1)", "apex (O2)",
              "apex (O3)")
# Config entries that name a run rather than what it computes: runs that differ only in these
# belong in one group (precision and opt level are the table's own axes).
NOT_SETTINGS = ("precision", "opt_level", "repeat", "seed", "run_id", "out_dir", "data_dir",
                "download", "quiet", "checkpoint", "keep_checkpoint", "resume")


DEFAULTS = Config().to_dict()


def load(folders, skipped: list | None = None) -> list[dict]:
    """Every run record under the folders. A result.json that cannot be read or is not a run
    record is left out, and (path, reason) appended to `skipped`."""
    records = []
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "**", "result.json"), recursive=True)):
            try:
                with open(path) as f:
                    record = json.load(f)
                why = results.problem(record)
            except (OSError, ValueError) as e:
                why = f"unreadable ({e})"
            if why:
                if skipped is not None:
                    skipped.append((path, why))
                continue
            record["_path"] = os.path.relpath(path, folder)
            records.append(record)
    return records


def device_of(record) -> str:
    env = record.get("env") or {}
    return f"{env.get('device_name', '?')} ({env.get('device', '?')})"


def precision_of(record) -> str:
    p = record["precision"]
    return p.get("effective") or p.get("requested")


def settings_of(record) -> dict:
    """What the run computed with. An option the record predates ran at today's default."""
    config = {**DEFAULTS, **record["config"]}
    return {k: v for k, v in sorted(config.items()) if k not in NOT_SETTINGS}


def label_of(record) -> str:
    """The row a run belongs to: its impl, and apex's opt level (O1 and O2 are not averaged)."""
    level = record.get("opt_level")
    return f"{record['impl']} ({level})" if level else record["impl"]


def seed_of(record):
    return record.get("seed", (record.get("config") or {}).get("seed"))


def rows(records) -> list[dict]:
    out = []
    for r in records:
        s, env = r.get("summary") or {}, r.get("env") or {}
        out.append({"device_name": env.get("device_name"), "device": env.get("device"),
                    "impl": r["impl"], "precision": precision_of(r),
                    "opt_level": r.get("opt_level"), "seed": seed_of(r),
                    "repeat": r.get("repeat"), "status": r["status"], "error": r.get("error"),
                    **{m: s.get(m) for m in METRICS}, "epochs_done": s.get("epochs_done", 0),
                    "weights_sha256": r.get("weights_sha256"), "run_id": r["run_id"],
                    "path": r.get("_path")})
    return out


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _order(names, canonical=()):
    return sorted(set(names), key=lambda n: (list(canonical).index(n) if n in canonical
                                             else len(canonical), n))


def groups_of(records) -> list[tuple[str, dict, list]]:
    """(device, settings, records) per device and settings, in the order first seen."""
    groups = {}
    for r in records:
        settings = settings_of(r)
        key = (device_of(r), json.dumps(settings, sort_keys=True, default=str))
        groups.setdefault(key, (key[0], settings, []))[2].append(r)
    return list(groups.values())


def _differences(groups) -> dict:
    """For each group, the settings in which it differs from another group of its device."""
    out = {}
    for i, (device, settings, _) in enumerate(groups):
        others = [s for j, (d, s, _) in enumerate(groups) if d == device and j != i]
        out[i] = {k: v for k, v in settings.items() if any(o.get(k) != v for o in others)}
    return out


def _cell(runs) -> dict:
    """One table cell: every run of one impl at one precision and settings. Timings spread over
    repeats and seeds; accuracy over seeds (each seed's median over its repeats: a repeat with
    the same seed trains the same weights)."""
    good = [r for r in runs if r["status"] == "ok"]
    cell = {"impl": runs[0]["impl"], "runs": len(runs), "ok": len(good),
            "opt_level": runs[0].get("opt_level"),
            **{m: spread([r["summary"].get(m) for r in good]) for m in METRICS}}
    per_seed = {}
    for r in good:
        per_seed.setdefault(seed_of(r), []).append(r["summary"].get("final_test_acc"))
    cell["final_test_acc"] = spread([spread(v)["median"] for v in per_seed.values()
                                     if spread(v)])
    cell["seeds"] = len(per_seed)
    return cell


def summarize(records) -> dict:
    groups = groups_of(records)
    differences = _differences(groups)
    out = []
    for i, (device, settings, recs) in enumerate(groups):
        ok = [r for r in recs if r["status"] == "ok"]
        env = (ok or recs)[0].get("env") or {}
        cells = {}
        for r in recs:
            cells.setdefault(precision_of(r), {}).setdefault(label_of(r), []).append(r)
        table = {precision: {label: _cell(cells[precision][label])
                             for label in _order(cells[precision], IMPL_ORDER)}
                 for precision in _order(cells, CANONICAL)}
        diff = differences[i]
        name = device + (" — " + ", ".join(f"{k} {v}" for k, v in diff.items()) if diff else "")
        group = {"device": name, "env": env, "config": (ok or recs)[0].get("config", {}),
                 "settings": settings, "precisions": table, "ratios": _ratios(table)}
        group["explanations"] = explain.lines(group)
        out.append(group)
    return {"schema": results.SCHEMA, "devices": out}


def _median(cell, metric):
    return (cell.get(metric) or {}).get("median")


def _ratios(table) -> dict:
    """Mixed precision against 32-true per row: speed-up (time ratio), memory ratios, and the
    accuracy change beside the seed-to-seed spread. The 32-true run of the same impl is the
    reference (apex: O0, whatever the mixed opt level)."""
    base = {c["impl"]: c for c in table.get("32-true", {}).values()}
    ratios = {}
    for precision, impls in table.items():
        if precision == "32-true":
            continue
        for label, cell in impls.items():
            ref = base.get(cell["impl"])
            if not ref or not _median(ref, "median_epoch_time_s") or \
                    not _median(cell, "median_epoch_time_s"):
                continue
            ratio = {"speedup": _median(ref, "median_epoch_time_s")
                     / _median(cell, "median_epoch_time_s")}
            for metric in ("activation_bytes", "peak_memory_bytes", "peak_beyond_data_bytes"):
                a, b = _median(cell, metric), _median(ref, metric)
                ratio[metric] = a / b if a is not None and b else None
            a, b = cell["final_test_acc"], ref["final_test_acc"]
            ratio["accuracy_change"] = a["median"] - b["median"] if a and b else None
            ratio["seeds"] = min(cell["seeds"], ref["seeds"])
            ratio["seed_spread"] = (max(a["max"] - a["min"], b["max"] - b["min"])
                                    if a and b and ratio["seeds"] > 1 else None)
            ratios.setdefault(label, {})[precision] = ratio
    return ratios


def _fmt(spread_, scale=1.0, fmt="{:.2f}"):
    if not spread_:
        return "–"
    med, lo, hi = (spread_[k] / scale for k in ("median", "min", "max"))
    if spread_["n"] == 1 or lo == hi:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(lo)}–{fmt.format(hi)}]"


def _x(value):
    return f"{value:.2f}×" if value is not None else "–"


def accuracy_words(r) -> str:
    change = r["accuracy_change"]
    if change is None:
        return "–"
    if r["seed_spread"] is None:
        return f"{change:+.4f} (one seed: no seed spread to weigh it against; --seeds N)"
    within = abs(change) <= r["seed_spread"]
    return (f"{change:+.4f}, {'within' if within else 'beyond'} seed noise (accuracy spans "
            f"{r['seed_spread']:.4f} across {r['seeds']} seeds)")


def markdown(summary, records) -> str:
    lines = ["# ampcompare report", ""]
    for dev in summary["devices"]:
        env, cfg = dev["env"], dev["config"]
        cpu = env.get("device") == "cpu"
        lines += [f"## {dev['device']}", ""]
        lines += ["| environment | |", "|---|---|"]
        for key in ("device_name", "cuda_capability", "tensor_cores", "cpu_model", "cpu_bf16",
                    "world_size", "nodes", "backend", "threads", "tf32", "cudnn_benchmark",
                    "channels_last", "deterministic",
                    "torch", "torchvision", "lightning", "apex", "python", "git_commit"):
            lines.append(f"| {key} | {env.get(key, '–')} |")
        lines += ["", f"Model `{cfg.get('model')}` on `{cfg.get('dataset')}`, batch "
                  f"{cfg.get('batch_size')}, {cfg.get('optimizer')} at lr {cfg.get('lr')}, "
                  f"epochs: {cfg.get('epochs')}. Median over repeats and seeds, [min–max] when "
                  f"they differ; accuracy over seeds. Epoch times leave out warm-up epochs (the "
                  f"first a process runs). Activation memory is what one training step saves "
                  f"for backward, measured on any device; peak memory is "
                  + ("the process's peak RSS on this CPU (set by libraries and data, not by "
                     "precision)." if cpu else "the CUDA allocator's peak; beyond data is that "
                     "peak less the image sets kept on the GPU, the same in every run, and is "
                     "the part a precision can change."), ""]
        if cpu:
            lines += ["On CPU the mixed precision is bf16-mixed: fp16 has no fast CPU kernels.",
                      ""]
        columns = ["impl", "runs ok", "epoch time (s)", "images/s", "TFLOP/s", "MFU",
                   "activation memory (MiB)",
                   *(["peak memory (MiB, process RSS)"] if cpu else
                     ["peak memory (MiB, allocator)", "beyond data (MiB)"]), "final test acc"]
        for precision, impls in dev["precisions"].items():
            lines += [f"### {precision}", "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
            for name, c in impls.items():
                lines.append(
                    f"| {name} | {c['ok']}/{c['runs']} | {_fmt(c['median_epoch_time_s'])} "
                    f"| {_fmt(c['images_per_s'], fmt='{:.0f}')} "
                    f"| {_fmt(c['achieved_tflops'], fmt='{:.3f}')} "
                    f"| {_fmt(c['mfu'], 0.01, '{:.1f}%')} "
                    f"| {_fmt(c['activation_bytes'], MIB, '{:.1f}')} "
                    f"| {_fmt(c['peak_memory_bytes'], MIB, '{:.0f}')} "
                    + ("" if cpu else f"| {_fmt(c['peak_beyond_data_bytes'], MIB, '{:.0f}')} ")
                    + f"| {_fmt(c['final_test_acc'], fmt='{:.4f}')} |")
            lines.append("")
        if dev["ratios"]:
            lines += ["### Mixed precision against 32-true", "",
                      "| impl | precision | speed-up (32-true time / mixed time) "
                      "| activation memory (mixed / 32-true) | peak memory (mixed / 32-true"
                      + (", process RSS" if cpu else ", allocator beyond data")
                      + ") | accuracy change |", "|---|---|---|---|---|---|"]
            peak = "peak_memory_bytes" if cpu else "peak_beyond_data_bytes"
            for impl, per in dev["ratios"].items():
                for precision, r in per.items():
                    lines.append(f"| {impl} | {precision} | {_x(r['speedup'])} "
                                 f"| {_x(r['activation_bytes'])} | {_x(r[peak])} "
                                 f"| {accuracy_words(r)} |")
            lines += ["", *[f"- {line}" for line in dev["explanations"]], "",
                      f"Reference: {explain.REFERENCE}", ""]
    failed = {}
    for r in records:
        if r["status"] != "ok":
            why = " ".join((r.get("error") or "").split())  # one table row, whatever it says
            key = (device_of(r), label_of(r), precision_of(r), r["status"], why)
            failed.setdefault(key, []).append(r["run_id"])
    if failed:
        lines += ["## Runs that did not finish", "",
                  "| device | impl | precision | runs | status | why |",
                  "|---|---|---|---|---|---|"]
        for (device, impl, precision, status, why), run_ids in failed.items():
            why = why.replace("|", "\\|")
            lines.append(f"| {device} | {impl} | {precision} | {', '.join(run_ids)} | {status} "
                         f"| {why} |")
        lines.append("")
    return "\n".join(lines)


def write(records, out_dir: str) -> dict:
    """Write the four report files into out_dir, each atomically; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(records)
    paths = {name: os.path.join(out_dir, name)
             for name in ("results.csv", "summary.json", "report.md", "benchmark.png")}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows(records))
    results.write_file(paths["results.csv"], lambda f: f.write(buf.getvalue()))
    results.write_json(paths["summary.json"], summary)
    text = markdown(summary, records)
    results.write_file(paths["report.md"], lambda f: f.write(text))
    chart.write(summary, paths["benchmark.png"])
    return paths
