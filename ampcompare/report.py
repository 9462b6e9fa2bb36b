"""report: results.csv, summary.json and report.md (and, through chart.py, benchmark.png) from
saved result.json files.

A pure function of the files: `ampcompare report DIR` on a compare folder rebuilds the same
report.md that compare wrote, and several folders (e.g. two machines) report side by side,
grouped by device and by settings: runs are only ever summarised together when everything that
changes what is computed or how fast (model, data, batch, optimizer, epochs, switches) is equal.
Repeats and seeds of the same settings are what the medians and [min–max] spreads run over.
Speed rests on per-step times: every step-time figure and every ratio between two of them
carries a 95% interval and a verdict in words (common/stats.py). A file that is not a run record
is skipped, and named.
"""

from __future__ import annotations

import csv
import glob
import html
import io
import json
import os
import re

from ampcompare import chart, explain
from ampcompare.chart import MIB
from common import files, results, stats, summary
from common import config
from common.precision import CANONICAL

METRICS = (
    "median_step_time_s",
    "median_epoch_time_s",
    "images_per_s",
    "achieved_tflops",
    "mfu",
    "data_wait_fraction",
    "activation_bytes",
    "peak_memory_bytes",
    "peak_beyond_data_bytes",
    "skipped_steps",
    "loss_scale_first",
    "loss_scale_last",
    "final_test_acc",
)
CSV_COLUMNS = (
    "device_name",
    "device",
    "impl",
    "precision",
    "opt_level",
    "seed",
    "repeat",
    "status",
    "error",
    *METRICS,
    "step_time_q1_s",
    "step_time_q3_s",
    "step_time_lo_s",
    "step_time_hi_s",
    "timed_steps",
    "epochs_done",
    "weights_sha256",
    "run_id",
    "path",
)
IMPL_ORDER = (
    "plain",
    "lightning",
    "fabric",
    "accelerate",
    "apex",
    "apex (O0)",
    "apex (O1)",
    "apex (O2)",
    "apex (O3)",
)


def load(folders, skipped: list | None = None) -> list[dict]:
    """Every run record under the folders. A result.json that cannot be read or is not a run
    record is left out, and (path, reason) appended to `skipped`."""
    records, seen = [], set()
    for folder in folders:
        for path in sorted(
            glob.glob(os.path.join(folder, "**", "result.json"), recursive=True)
        ):
            real = os.path.realpath(path)
            if real in seen:  # a run is one run, however many of the folders reach it
                continue
            seen.add(real)
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
                why = results.why_not_a_record(record)
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


# What a run was measured with, beside its device: runs whose software, code or host differ
# are different settings, never one cell.
SOFTWARE = (
    "torch",
    "torchvision",
    "lightning",
    "accelerate",
    "apex",
    "python",
    "git_commit",
    "host",
)


def software_of(record) -> dict:
    """Its software, code and host, and the source of its model where it is the user's own."""
    env = record.get("env") or {}
    return {
        **{k: env.get(k) for k in SOFTWARE},
        "model_source_sha256": (record.get("model") or {}).get("source_sha256"),
    }


def settings_of(record) -> dict:
    """What the run computed with: the options config.py declares settings (the others name a
    run, or are the tables' own axes, precision and opt level). An option the record predates
    ran at today's default."""
    options = {**config.Config().to_dict(), **record["config"]}
    return {k: options[k] for k in sorted(config.names(setting=True))}


def label_of(record) -> str:
    """The row a run belongs to: its impl, and apex's opt level (O1 and O2 are not averaged)."""
    level = record.get("opt_level")
    return f"{record['impl']} ({level})" if level else record["impl"]


def seed_of(record):
    return record.get("seed", (record.get("config") or {}).get("seed"))


def rows(records) -> list[dict]:
    """One CSV row per run: its own figures, and the 95% interval of its median step time
    (from its steps alone)."""
    out = []
    for r in records:
        s, env = r.get("summary") or {}, r.get("env") or {}
        own = sample_of([r], r["run_id"])
        interval = own.estimate() if own else None
        out.append(
            {
                "device_name": env.get("device_name"),
                "device": env.get("device"),
                "impl": r["impl"],
                "precision": precision_of(r),
                "opt_level": r.get("opt_level"),
                "seed": seed_of(r),
                "repeat": r.get("repeat"),
                "status": r["status"],
                "error": r.get("error"),
                **{m: s.get(m) for m in METRICS},
                "step_time_q1_s": s.get("step_time_q1_s"),
                "step_time_q3_s": s.get("step_time_q3_s"),
                "step_time_lo_s": interval.lo if interval else None,
                "step_time_hi_s": interval.hi if interval else None,
                "timed_steps": s.get("timed_steps"),
                "epochs_done": s.get("epochs_done", 0),
                "weights_sha256": r.get("weights_sha256"),
                "run_id": r["run_id"],
                "path": r.get("_path"),
            }
        )
    return out


def sample_of(runs, name: str) -> stats.Sample:
    """The timed step times of each run (summary.timed_steps), for the bootstrap."""
    return stats.Sample([summary.timed_steps(r.get("epochs") or [])[0] for r in runs], name)


def _order(names, canonical=()):
    return sorted(
        set(names),
        key=lambda n: (list(canonical).index(n) if n in canonical else len(canonical), n),
    )


def groups_of(records) -> list[tuple[str, dict, list]]:
    """(device, settings and software, records) per device, settings and software, in the
    order first seen."""
    groups = {}
    for r in records:
        settings = {**settings_of(r), **software_of(r)}
        key = (device_of(r), json.dumps(settings, sort_keys=True, default=str))
        groups.setdefault(key, (key[0], settings, []))[2].append(r)
    return list(groups.values())


def _differences(groups) -> dict:
    """For each group, the settings or software in which it differs from another group of its
    device."""
    out = {}
    for i, (device, settings, _) in enumerate(groups):
        others = [s for j, (d, s, _) in enumerate(groups) if d == device and j != i]
        out[i] = {k: v for k, v in settings.items() if any(o.get(k) != v for o in others)}
    return out


def _cell(runs, name: str) -> tuple[dict, stats.Sample]:
    """One table cell: every run of one impl at one precision and settings, and the sample of
    its ok runs' step times. Timings spread over repeats and seeds; accuracy over seeds (each
    seed's median over its repeats: a repeat with the same seed trains the same weights)."""
    good = [r for r in runs if r["status"] == "ok"]
    cell = {
        "impl": runs[0]["impl"],
        "runs": len(runs),
        "ok": len(good),
        "opt_level": runs[0].get("opt_level"),
        **{m: stats.spread([r["summary"].get(m) for r in good]) for m in METRICS},
    }
    per_seed = {}
    for r in good:
        per_seed.setdefault(seed_of(r), []).append(r["summary"].get("final_test_acc"))
    cell["final_test_acc"] = stats.spread(
        [stats.spread(v)["median"] for v in per_seed.values() if stats.spread(v)]
    )
    cell["seeds"] = len(per_seed)
    sample = sample_of(good, name)
    cell["step_time_s"] = sample.estimate().to_dict() if sample else None
    cell["weights"] = sorted({r.get("weights_sha256") or "" for r in good})
    return cell, sample


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
        table, samples = {}, {}
        for precision in _order(cells, CANONICAL):
            table[precision] = {}
            for label in _order(cells[precision], IMPL_ORDER):
                table[precision][label], samples[precision, label] = _cell(
                    cells[precision][label], f"{device} {i} {precision} {label}"
                )
        diff = differences[i]
        name = device + (" — " + ", ".join(f"{k} {v}" for k, v in diff.items()) if diff else "")
        group = {
            "device": name,
            "env": env,
            "config": (ok or recs)[0].get("config", {}),
            "settings": {
                k: v for k, v in settings.items() if k not in (*SOFTWARE, "model_source_sha256")
            },
            "software": {k: settings[k] for k in (*SOFTWARE, "model_source_sha256")},
            "precisions": table,
            "ratios": _ratios(table, samples),
            "overheads": _overheads(table, samples),
        }
        group["notes"] = _notes(group)
        group["explanations"] = explain.lines(group)
        out.append(group)
    return {"schema": results.SCHEMA, "devices": out}


def _ratios(table, samples) -> dict:
    """Mixed precision against 32-true per row: the speed-up (32-true's step time over the
    mixed one's, with its interval and verdict), memory ratios, and the accuracy change beside
    the seed-to-seed spread. The 32-true run of the same impl is the reference (apex: O0,
    whatever the mixed opt level)."""
    base = {c["impl"]: label for label, c in table.get("32-true", {}).items()}
    ratios = {}
    for precision, impls in table.items():
        if precision == "32-true":
            continue
        for label, cell in impls.items():
            ref_label = base.get(cell["impl"])
            if ref_label is None:
                continue
            ref = table["32-true"][ref_label]
            if not ref["ok"] or not cell["ok"]:
                continue
            a, b = samples["32-true", ref_label], samples[precision, label]
            speedup = stats.ratio(a, b) if a and b else None
            ratio = {
                "speedup": {**speedup.to_dict(), "verdict": stats.speed_words(speedup)}
                if speedup
                else None
            }
            for metric in ("activation_bytes", "peak_memory_bytes", "peak_beyond_data_bytes"):
                x, y = stats.median_of(cell, metric), stats.median_of(ref, metric)
                ratio[metric] = x / y if x is not None and y else None
            x, y = cell["final_test_acc"], ref["final_test_acc"]
            ratio["accuracy_change"] = x["median"] - y["median"] if x and y else None
            ratio["seeds"] = min(cell["seeds"], ref["seeds"])
            ratio["seed_spread"] = (
                max(x["max"] - x["min"], y["max"] - y["min"])
                if x and y and ratio["seeds"] > 1
                else None
            )
            ratios.setdefault(label, {})[precision] = ratio
    return ratios


def _overheads(table, samples) -> dict:
    """Per precision, what each framework adds to a step over the plain loop at the same
    precision: the difference of step times, with its interval, as µs and as a share."""
    out = {}
    for precision, impls in table.items():
        plain = samples.get((precision, "plain"))
        if "plain" not in impls or not plain:
            continue
        for label in impls:
            sample = samples[precision, label]
            if label == "plain" or not sample:
                continue
            est = stats.difference(sample, plain)
            out.setdefault(precision, {})[label] = {
                **est.to_dict(),
                "share": est.value / plain.value,
                "plain_step_s": plain.value,
                "verdict": stats.overhead_words(est, plain.value),
            }
    return out


def _notes(group, quote=str) -> list[str]:
    """What the reader must know to weigh the intervals: that one run per arm measures only
    the noise within a run; that arms which did the same arithmetic got speed-ups that do not
    overlap, i.e. the machine's noise exceeded what the runs could measure."""
    notes = []
    cells = [
        c
        for impls in group["precisions"].values()
        for c in impls.values()
        if c.get("step_time_s")
    ]
    if any(c["step_time_s"]["runs"] == [1] for c in cells):
        notes.append(
            "One run per cell: each interval covers the noise within that run (its "
            "steps), not the noise between processes, which on a busy machine can be "
            "larger; --repeats N (3 or more) measures that too."
        )
    for precision in group["precisions"]:
        same = _same_arithmetic(group, precision)
        for a, b in same:
            x = group["ratios"][a][precision]["speedup"]
            y = group["ratios"][b][precision]["speedup"]
            if not stats.Estimate(x["estimate"], *x["interval"]).overlaps(
                stats.Estimate(y["estimate"], *y["interval"])
            ):
                notes.append(
                    f"{quote(a)} and {quote(b)} trained bitwise-identical weights at 32-true "
                    f"and {quote(precision)}, yet their {quote(precision)} speed-ups do not "
                    f"overlap ({x['verdict']}; "
                    f"{y['verdict']}): the machine's noise exceeded these intervals. Measure "
                    f"on an idle machine, with --repeats 3 or more, so that the intervals "
                    f"include the noise between processes."
                )
    return notes


def _same_arithmetic(group, precision) -> list[tuple[str, str]]:
    """Pairs of rows whose ok runs trained the same weights (the same weights_sha256 sets) at
    32-true and at this precision, and which both have a speed-up."""
    table, ratios = group["precisions"], group["ratios"]
    labels = [
        label
        for label in table.get(precision, {})
        if (ratios.get(label, {}).get(precision) or {}).get("speedup")
    ]

    def weights(label, p):
        impl = table[precision][label]["impl"]
        cell = (
            next((c for c in table.get(p, {}).values() if c["impl"] == impl), None)
            if p == "32-true"
            else table[p][label]
        )
        return tuple(cell["weights"]) if cell and all(cell["weights"]) else None

    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if all(
                weights(a, p) is not None and weights(a, p) == weights(b, p)
                for p in ("32-true", precision)
            ):
                pairs.append((a, b))
    return pairs


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
    return (
        f"{change:+.4f}, {'within' if within else 'beyond'} seed noise (accuracy spans "
        f"{r['seed_spread']:.4f} across {r['seeds']} seeds)"
    )


ENV_KEYS = (
    "device_name",
    "cuda_capability",
    "tensor_cores",
    "cpu_model",
    "cpu_bf16",
    "world_size",
    "nodes",
    "backend",
    "threads",
    "tf32",
    "cudnn_benchmark",
    "channels_last",
    "deterministic",
    *(key for key in SOFTWARE if key != "host"),
)


def md(value) -> str:
    """A value from a record, as Markdown text that stays text: one line, no table cell break,
    no HTML, no code span, link, emphasis or heading (records come from other machines)."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return MARKUP.sub(r"\\\1", text)


MARKUP = re.compile(r"([\\`*_\[\]|#~$])")


def markdown(summary, records) -> str:
    lines = ["# ampcompare report", ""]
    for dev in summary["devices"]:
        lines += [f"## {md(dev['device'])}", "", *_environment(dev), *_method(dev)]
        for precision, impls in dev["precisions"].items():
            lines += _precision_table(dev, precision, impls)
        lines += _overhead_table(dev)
        lines += _ratio_table(dev)
    lines += _unfinished(records)
    return "\n".join(lines)


def _environment(dev) -> list[str]:
    return [
        "| environment | |",
        "|---|---|",
        *[f"| {key} | {md(dev['env'].get(key, '–'))} |" for key in ENV_KEYS],
        "",
    ]


def _method(dev) -> list[str]:
    cfg, cpu = dev["config"], dev["env"].get("device") == "cpu"
    clock = "perf_counter" if cpu else "CUDA events read once per epoch"
    lines = [
        f"Model {md(cfg.get('model'))} on {md(cfg.get('dataset'))}, batch "
        f"{md(cfg.get('batch_size'))}, {md(cfg.get('optimizer'))} at lr {md(cfg.get('lr'))}, "
        f"epochs: {md(cfg.get('epochs'))}. A step's time runs from the end of one optimizer "
        f"step to the end of the next, the wait for its batch included ({clock}); warm-up "
        f"epochs (the first a process runs) are left out, or a one-epoch run's first steps. "
        f"Step time "
        f"is the mean over runs of each run's median step, with its 95% interval (a "
        f"bootstrap over runs, then blocks of steps); other figures are medians over "
        f"repeats and seeds, [min–max] when they differ; accuracy over seeds. Activation "
        f"memory is what one training step saves for backward, measured on any device; "
        f"peak memory is "
        + (
            "the process's peak RSS on this CPU (set by libraries and data, not by precision)."
            if cpu
            else "the CUDA allocator's peak; beyond data is that peak "
            "less the image sets kept on the GPU, the same in every run, and is the part a "
            "precision can change."
        ),
        "",
    ]
    if cpu:
        lines += ["On CPU the mixed precision is bf16-mixed: fp16 has no fast CPU kernels.", ""]
    return lines


def _precision_table(dev, precision, impls) -> list[str]:
    cpu = dev["env"].get("device") == "cpu"
    columns = [
        "impl",
        "runs ok",
        "step time [95% interval]",
        "epoch time (s)",
        "images/s",
        "TFLOP/s",
        "MFU",
        "activation memory (MiB)",
        *(
            ["peak memory (MiB, process RSS)"]
            if cpu
            else ["peak memory (MiB, allocator)", "beyond data (MiB)"]
        ),
        "final test acc",
    ]
    lines = [
        f"### {md(precision)}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for name, c in impls.items():
        lines.append(
            f"| {md(name)} | {c['ok']}/{c['runs']} | {_step(c.get('step_time_s'))} "
            f"| {_fmt(c['median_epoch_time_s'])} "
            f"| {_fmt(c['images_per_s'], fmt='{:.0f}')} "
            f"| {_fmt(c['achieved_tflops'], fmt='{:.3f}')} "
            f"| {_fmt(c['mfu'], 0.01, '{:.1f}%')} "
            f"| {_fmt(c['activation_bytes'], MIB, '{:.1f}')} "
            f"| {_fmt(c['peak_memory_bytes'], MIB, '{:.0f}')} "
            + ("" if cpu else f"| {_fmt(c['peak_beyond_data_bytes'], MIB, '{:.0f}')} ")
            + f"| {_fmt(c['final_test_acc'], fmt='{:.4f}')} |"
        )
    return [*lines, ""]


def _step(est) -> str:
    """A step time and its interval in one unit: "246 ms [241–252]"."""
    return stats.duration_with_interval(est["estimate"], *est["interval"]) if est else "–"


def _overhead_table(dev) -> list[str]:
    if not dev["overheads"]:
        return []
    lines = [
        "### What each framework adds to a step, against plain at the same precision",
        "",
        "| impl | precision | time added per step |",
        "|---|---|---|",
    ]
    for precision, per in dev["overheads"].items():
        for label, o in per.items():
            lines.append(f"| {md(label)} | {md(precision)} | {o['verdict']} |")
    return [*lines, ""]


def _ratio_table(dev) -> list[str]:
    if not dev["ratios"] and not dev["notes"]:
        return []
    cpu = dev["env"].get("device") == "cpu"
    lines = []
    if dev["ratios"]:
        lines += [
            "### Mixed precision against 32-true",
            "",
            "| impl | precision | speed (32-true step time / mixed step time) "
            "| activation memory (mixed / 32-true) | peak memory (mixed / 32-true"
            + (", process RSS" if cpu else ", allocator beyond data")
            + ") | accuracy change |",
            "|---|---|---|---|---|---|",
        ]
        peak = "peak_memory_bytes" if cpu else "peak_beyond_data_bytes"
        for impl, per in dev["ratios"].items():
            for precision, r in per.items():
                speed = r["speedup"]["verdict"] if r["speedup"] else "– (no step times)"
                lines.append(
                    f"| {md(impl)} | {md(precision)} | {speed} "
                    f"| {_x(r['activation_bytes'])} | {_x(r[peak])} "
                    f"| {accuracy_words(r)} |"
                )
        lines.append("")
    lines += [*[f"- {line}" for line in (*_notes(dev, md), *explain.lines(dev, md))], ""]
    if dev["ratios"]:
        lines += [f"Reference: {explain.REFERENCE}", ""]
    return lines


def _unfinished(records) -> list[str]:
    failed = {}
    for r in records:
        if r["status"] != "ok":
            why = " ".join((r.get("error") or "").split())  # one table row, whatever it says
            key = (device_of(r), label_of(r), precision_of(r), r["status"], why)
            failed.setdefault(key, []).append(r["run_id"])
    if not failed:
        return []
    lines = [
        "## Runs that did not finish",
        "",
        "| device | impl | precision | runs | status | why |",
        "|---|---|---|---|---|---|",
    ]
    for (device, impl, precision, status, why), run_ids in failed.items():
        lines.append(
            f"| {md(device)} | {md(impl)} | {md(precision)} "
            f"| {', '.join(md(r) for r in run_ids)} | {md(status)} | {md(why)} |"
        )
    return [*lines, ""]


def write(records, out_dir: str) -> dict:
    """Write the four report files into out_dir, each atomically; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(records)
    paths = {
        name: os.path.join(out_dir, name)
        for name in ("results.csv", "summary.json", "report.md", "benchmark.png")
    }
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows(records))
    files.write_file(paths["results.csv"], lambda f: f.write(buf.getvalue()))
    files.write_json(paths["summary.json"], summary)
    text = markdown(summary, records)
    files.write_file(paths["report.md"], lambda f: f.write(text))
    chart.write(summary, paths["benchmark.png"])
    return paths
