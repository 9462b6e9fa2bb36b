"""report: results.csv, summary.json and report.md (and, through chart.py, benchmark.png) from
saved result.json files.

A pure function of the files: `ampcompare report DIR` on a compare folder rebuilds the same
report.md that compare wrote, and several folders (e.g. two machines) report side by side,
grouped by device and by settings: runs are only ever summarised together when everything that
changes what is computed or how fast (model, data, batch, optimizer, epochs, switches) is equal.
Repeats and seeds of the same settings are what the medians and [min–max] spreads run over.
Speed rests on per-step times: every step-time figure and every ratio between two of them
carries a 95% interval and a verdict in words (ampcompare/stats.py). A file that is not a run
record is skipped, and named.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re


from ampcompare import analysis, chart, explain
from ampcompare.chart import MIB
from ampcompare.findings import Group, Ratio, Summary
from record.summary import MODEL_STATE
from record import files, signals
from ampcompare import stats
from common import console

CSV_COLUMNS = (
    "device_name",
    "device",
    "impl",
    "precision",
    "strategy",
    "opt_level",
    "seed",
    "repeat",
    "position",
    "status",
    "error",
    *analysis.METRICS,
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


def rows(records) -> list[dict]:
    """One CSV row per run: its own figures, and the 95% interval of its median step time
    (from its steps alone)."""
    out = []
    for r in records:
        s, env = r.summary, r.env
        own = analysis.sample_of([r], r.run_id)
        interval = stats.level(own) if own else None
        out.append(
            {
                "device_name": env.get("device_name"),
                "device": env.get("device"),
                "impl": analysis.arm_of(r),
                "precision": analysis.precision_of(r),
                "strategy": r.config.get("strategy", "ddp"),
                "opt_level": r.opt_level,
                "seed": analysis.seed_of(r),
                "repeat": r.repeat,
                "position": r.config.get("position"),
                "status": r.status,
                "error": r.error,
                **{m: s.get(m) for m in analysis.METRICS},
                "step_time_q1_s": s.get("step_time_q1_s"),
                "step_time_q3_s": s.get("step_time_q3_s"),
                "step_time_lo_s": interval.lo if interval else None,
                "step_time_hi_s": interval.hi if interval else None,
                "timed_steps": s.get("timed_steps"),
                "epochs_done": s.get("epochs_done", 0),
                "weights_sha256": r.weights_sha256,
                "run_id": r.run_id,
                "path": r.found_at,
            }
        )
    return out


def _fmt(spread_: stats.Spread | None, scale=1.0, fmt="{:.2f}"):
    if not spread_:
        return "–"
    med, lo, hi = (v / scale for v in (spread_.median, spread_.min, spread_.max))
    if spread_.n == 1 or lo == hi:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(lo)}–{fmt.format(hi)}]"


def _ratio(value):
    return f"{value:.2f}×" if value is not None else "–"


def accuracy_words(r: Ratio) -> str:
    change = r.accuracy_change
    if change is None:
        return "–"
    if r.seed_spread is None:
        return f"{change:+.4f} (one seed: no seed spread to weigh it against; --seeds N)"
    within = abs(change) <= r.seed_spread
    return (
        f"{change:+.4f}, {'within' if within else 'beyond'} seed noise (accuracy spans "
        f"{r.seed_spread:.4f} across {r.seeds} seeds)"
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
    *(key for key in analysis.SOFTWARE if key != "host"),
)


def md(value) -> str:
    """A value from a record, as Markdown text that stays text: one line, no table cell break,
    no HTML, no code span, link, emphasis or heading (records come from other machines)."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return MARKUP.sub(r"\\\1", text)


MARKUP = re.compile(r"([\\`*_\[\]|#~$])")


def markdown(summary: Summary, records, missing=()) -> str:
    lines = ["# ampcompare report", ""]
    if not records and not missing:  # a comparison stopped before its first arm recorded
        lines += ["No run has left a record here yet: nothing was measured.", ""]
    for dev in summary.devices:
        lines += [f"## {md(dev.device)}", "", *_noise_exceeded(dev)]
        lines += [*_environment(dev), *_method(dev)]
        for precision, impls in dev.precisions.items():
            lines += _precision_table(dev, precision, impls)
        lines += _overhead_table(dev)
        lines += _ratio_table(dev)
        lines += _state_table(dev)
        lines += _weights_table(dev)
    for sharded in summary.sharded:
        lines += _sharded_table(sharded)
    lines += _unfinished(records, missing)
    return "\n".join(lines)


def _noise_exceeded(dev: Group) -> list[str]:
    if not dev.control_claims:
        return []
    return [
        f"**This machine's noise exceeded the method here**: plain against itself claimed a "
        f"difference ({md('; '.join(dev.control_claims))}). No verdict below is stated as "
        f"fact; the figures and their intervals stand as measured.",
        "",
    ]


def _environment(dev: Group) -> list[str]:
    return [
        "| environment | |",
        "|---|---|",
        *[f"| {key} | {md(dev.env.get(key, '–'))} |" for key in ENV_KEYS],
        "",
    ]


def _method(dev: Group) -> list[str]:
    cfg, cpu = dev.config, dev.on_cpu
    clock = "perf_counter" if cpu else "CUDA events read once per epoch"
    lines = [
        f"Model {md(cfg.get('model'))} on {md(cfg.get('dataset'))}, batch "
        f"{md(cfg.get('batch_size'))}, {md(cfg.get('optimizer'))} at lr {md(cfg.get('lr'))}, "
        f"epochs: {md(cfg.get('epochs'))}. A step's time runs from the end of one optimizer "
        f"step to the end of the next, the wait for its batch included ({clock}); warm-up "
        f"epochs (the first a process runs) are left out, or a one-epoch run's first steps. "
        f"Step time is the geometric mean over runs of each run's median step, with its "
        f"95% interval: Student's t over the noise between processes, pooled over every "
        f"cell here ({_pooled(dev)}), or a block bootstrap of the runs' own steps where that "
        f"is wider; no verdict rests on fewer than {stats.MIN_DF} degrees of freedom or "
        f"{stats.MIN_STEPS} timed steps a run. The intervals of a table of verdicts (what "
        f"each framework adds, mixed against 32-true) hold together: each row's at "
        f"1 − 5%/rows, so that the table as a whole claims a false difference at most 5% "
        f"of the time. Other figures are medians over "
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
    if cfg.get("strategy") == "fsdp":
        lines += [SHARDED, ""]
    return lines


SHARDED = (
    "Sharded with FSDP2 (torch's fully_shard on each block and on the root; gradients "
    "reduced in fp32 at every precision). A -mixed precision is autocast over fp32 shards, "
    "as under DDP; a -true one casts the model before it is sharded, so its shards are in the "
    "half type; bf16-fsdp is FSDP's own mixed precision, MixedPrecisionPolicy(param_dtype="
    "bf16): fp32 shards and optimizer state, each block's parameters gathered in bf16 and "
    "whole modules computing in it, the norm layers kept fp32 (docs/fsdp.md). Model state "
    "is per rank: each rank's shards."
)


def _pooled(dev: Group) -> str:
    if not dev.noise.df:
        return "no cell has two runs: nothing to pool"
    sd = math.expm1(math.sqrt(dev.noise.variance))
    return f"a run's own noise {sd:.1%}, {dev.noise.df} degrees of freedom"


def _precision_table(dev: Group, precision, impls) -> list[str]:
    cpu = dev.on_cpu
    columns = [
        "impl",
        "runs ok",
        "step time [95% interval]",
        "epoch time (s)",
        "images/s",
        "TFLOP/s",
        "MFU",
        "activation memory (MiB)",
        "model state (MiB)",
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
        m = c.metrics
        lines.append(
            f"| {md(name)} | {c.ok}/{c.runs} | {_step(c.step_time_s)} "
            f"| {_fmt(m['median_epoch_time_s'])} "
            f"| {_fmt(m['images_per_s'], fmt='{:.0f}')} "
            f"| {_fmt(m['achieved_tflops'], fmt='{:.3f}')} "
            f"| {_fmt(m['mfu'], 0.01, '{:.1f}%')} "
            f"| {_fmt(m['activation_bytes'], MIB, '{:.1f}')} "
            f"| {_fmt(m[MODEL_STATE], MIB, '{:.2f}')} "
            f"| {_fmt(m['peak_memory_bytes'], MIB, '{:.0f}')} "
            + ("" if cpu else f"| {_fmt(m['peak_beyond_data_bytes'], MIB, '{:.0f}')} ")
            + f"| {_fmt(m['final_test_acc'], fmt='{:.4f}')} |"
        )
    return [*lines, ""]


def _step(est: stats.Estimate | None) -> str:
    """A step time and its interval in one unit: "246 ms [241–252]"."""
    return stats.duration_with_interval(est) if est else "–"


def _overhead_table(dev: Group) -> list[str]:
    if not dev.overheads:
        return []
    lines = [
        "### What each framework adds to a step, against plain at the same precision",
        "",
        "| impl | precision | time added per step |",
        "|---|---|---|",
    ]
    for precision, per in dev.overheads.items():
        for label, o in per.items():
            lines.append(f"| {md(label)} | {md(precision)} | {o.verdict} |")
    return [*lines, ""]


def _ratio_table(dev: Group) -> list[str]:
    if not dev.ratios and not dev.notes:
        return []
    cpu = dev.on_cpu
    lines = []
    if dev.ratios:
        lines += [
            "### Each precision against 32-true",
            "",
            "| impl | precision | speed (32-true step time / its step time) "
            "| activation memory (its / 32-true) | peak memory (its / 32-true"
            + (", process RSS" if cpu else ", allocator beyond data")
            + ") | accuracy change |",
            "|---|---|---|---|---|---|",
        ]
        peak = "peak_memory_bytes" if cpu else "peak_beyond_data_bytes"
        for impl, per in dev.ratios.items():
            for precision, r in per.items():
                speed = r.speedup.verdict if r.speedup else "– (no step times)"
                lines.append(
                    f"| {md(impl)} | {md(precision)} | {speed} "
                    f"| {_ratio(r.activation_bytes)} | {_ratio(getattr(r, peak))} "
                    f"| {accuracy_words(r)} |"
                )
        lines.append("")
    lines += [
        *[f"- {line}" for line in (*analysis.notes(dev, md), *explain.lines(dev, md))],
        "",
    ]
    if dev.ratios:
        lines += [f"Reference: {explain.REFERENCE}", ""]
    return lines


STATE_COLUMNS = {
    "parameter_bytes": "parameters",
    "gradient_bytes": "gradients",
    "optimizer_state_bytes": "optimizer state",
    "master_weight_bytes": "master weights",
    "scaler_bytes": "loss scaler",
    MODEL_STATE: "all of it",
}


def _state_table(dev: Group) -> list[str]:
    """What each rung keeps between steps against 32-true: each part's ratio and their sum's
    (a part 32-true has none of is given in bytes)."""
    rows = [
        (impl, precision, r)
        for impl, per in dev.ratios.items()
        for precision, r in per.items()
        if r.state.get(MODEL_STATE) is not None
    ]
    if not rows:
        return []
    lines = [
        "### Model state against 32-true (parameters, gradients, optimizer state, master "
        "weights and loss scaler, counted from the tensors)",
        "",
        "| impl | precision | " + " | ".join(STATE_COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(STATE_COLUMNS),
    ]
    for impl, precision, r in rows:
        cell = dev.precisions[precision][impl]
        parts = [_state_part(r.state.get(name), cell.median(name)) for name in STATE_COLUMNS]
        lines.append(f"| {md(impl)} | {md(precision)} | " + " | ".join(parts) + " |")
    lines += [
        "",
        "A part that 32-true keeps none of (master weights, a loss scaler) is given in bytes.",
    ]
    return [*lines, ""]


def _weights_table(dev: Group) -> list[str]:
    """At each precision, which arms trained bitwise-identical weights (every ok run's hash the
    same set): the equivalence the tables' figures rest on, as measured here."""
    rows = []
    for precision, cells in dev.precisions.items():
        sets = {}
        for label, cell in cells.items():
            if cell.weights and all(cell.weights):
                sets.setdefault(tuple(cell.weights), []).append(label)
        if sum(len(labels) for labels in sets.values()) > 1:
            classes = " · ".join(" = ".join(md(x) for x in labels) for labels in sets.values())
            rows.append(f"| {md(precision)} | {classes} |")
    if not rows:
        return []
    return [
        "### Trained weights",
        "",
        "Arms joined by = trained bitwise-identical weights (SHA-256 of the final state); "
        "· separates arms whose weights differ.",
        "",
        "| precision | arms |",
        "|---|---|",
        *rows,
        "",
    ]


def _sharded_table(sharded) -> list[str]:
    """Each arm's model state per rank under FSDP over the plain loop's under DDP."""
    lines = [
        f"## Model state per rank: {md(sharded.device)} against {md(sharded.against)}",
        "",
        "Each part under FSDP over the plain loop's under DDP, same settings otherwise: "
        "FSDP keeps each rank's shard of the parameters, gradients and optimizer state, DDP "
        "a whole copy on every rank.",
        "",
        "| impl | precision | " + " | ".join(STATE_COLUMNS.values()) + " | DDP's weights |",
        "|---|---|" + "---|" * (len(STATE_COLUMNS) + 1),
    ]
    for row in sharded.rows:
        parts = [_state_part(row.state.get(name), None) for name in STATE_COLUMNS]
        same = {True: "identical", False: "differ", None: "–"}[row.same_weights]
        lines.append(
            f"| {md(row.impl)} | {md(row.precision)} | " + " | ".join(parts) + f" | {same} |"
        )
    return [*lines, ""]


def _state_part(ratio, size) -> str:
    if ratio is not None:
        return f"{ratio:.2f}×"
    return f"{size:,.0f} B" if size else "–"


def _unfinished(records, missing=()) -> list[str]:
    failed = {}
    for arm, why in missing:  # planned, and no record to read
        key = ("", arm.impl, arm.precision, "no record", why)
        failed.setdefault(key, []).append(arm.run_id)
    for r in records:
        if r.status != "ok":
            why = " ".join((r.error or "").split())  # one table row, whatever it says
            key = (
                analysis.device_of(r),
                analysis.label_of(r),
                analysis.precision_of(r),
                r.status,
                why,
            )
            failed.setdefault(key, []).append(r.run_id)
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


FILES = ("results.csv", "summary.json", "report.md", "benchmark.png")


def write(records, out_dir: str, missing=()) -> dict:
    """Write the four report files into out_dir, each atomically; return their paths.
    missing: (arm, why) of a comparison's planned runs that left no record."""
    os.makedirs(out_dir, exist_ok=True)
    summary = analysis.summarize(records)
    paths = {name: os.path.join(out_dir, name) for name in FILES}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows(records))
    files.write_file(paths["results.csv"], lambda f: f.write(buf.getvalue()))
    files.write_json(paths["summary.json"], summary.to_dict())
    text = markdown(summary, records, missing)
    files.write_file(paths["report.md"], lambda f: f.write(text))
    chart.write(summary, paths["benchmark.png"])
    return paths


# --- what the commands print and return -------------------------------------------------


def write_for_compare(folder: str, code: int, planned=()) -> int:
    """Write the comparison's report from every record in its folder; the exit code.
    planned: the plan's arms; one that left no readable record (its folder replaced by
    a file, its record cut short) is a row of the report and fails the comparison."""
    records, skipped = records_in([folder])
    missing = [] if code else _missing(planned, records, skipped)
    try:
        with signals.deferred():  # a report is written whole; a signal now waits for it
            paths = write(records, folder, missing)
    except OSError as e:
        console.say(
            f"ampcompare: error: could not write the report into {folder}: {e.strerror}",
            err=True,
        )
        return 1
    except KeyboardInterrupt:
        console.say(
            f"ampcompare: interrupted; the report is complete (finish the comparison "
            f"with ampcompare compare --resume {folder})",
            err=True,
        )
        return 130
    echo(paths)
    failed = [r for r in records if r.status not in ("ok", "unavailable")]
    if missing:
        console.say(
            f"ampcompare: error: {len(missing)} planned run(s) left no readable record "
            f"({', '.join(arm.run_id for arm, _ in missing)}): see the report",
            err=True,
        )
    return code or (1 if failed or missing else 0)


def _missing(planned, records, skipped) -> list:
    """(arm, why) for each planned arm without a record among `records`."""
    found = {os.path.dirname(r.found_at) for r in records}  # a run's folder is its run_id
    why_skipped = {os.path.basename(os.path.dirname(path)): why for path, why in skipped}
    return [
        (arm, why_skipped.get(arm.run_id, "no result.json in its folder"))
        for arm in planned
        if arm.run_id not in found
    ]


def records_in(folders, quiet: bool = False) -> tuple[list, list]:
    """Every run record under the folders, and (path, why) of each file skipped, said in a
    warning line each unless `quiet`."""
    skipped = []
    records = analysis.load(folders, skipped)
    for path, why in [] if quiet else skipped:
        console.say(f"ampcompare: warning: skipped {path}: {why}", err=True)
    return records, skipped


def echo(paths: dict) -> None:
    with open(paths["report.md"], encoding="utf-8") as f:
        console.say(f.read())
    for name, path in paths.items():
        console.say(f"{name}: {path}")
