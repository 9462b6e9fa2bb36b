"""benchmark.png: grouped bars like the reference benchmark's chart — memory, step time and
accuracy per implementation and precision. Step time is the report's figure with its 95%
interval as the error bar; memory and accuracy are medians with min–max error bars (over
repeats; accuracy over seeds).

The memory panel shows activation memory (what a step saves for backward), which means the
same on every device; with a GPU, a second panel shows the CUDA allocator's peak. A CPU's peak
RSS (set by libraries and data) is only in the report's table."""

from __future__ import annotations

import functools
import textwrap
import warnings

from ampcompare import stats
from ampcompare.findings import Cell, Summary
from record import files

MIB = 2**20


def figure(summary: Summary):
    """The chart as a matplotlib Figure (no pyplot: nothing global is touched)."""
    from matplotlib.figure import Figure

    cuda = any(dev.env.get("device") == "cuda" for dev in summary.devices)
    panels = (
        ("activation_bytes", "activation memory (MiB)", MIB),
        *((("peak_memory_bytes", "CUDA allocator peak (MiB)", MIB),) if cuda else ()),
        ("step_time_s", "step time (ms), 95% interval", 1e-3),
        ("final_test_acc", "final test accuracy", 1.0),
    )
    groups, precisions = _groups(summary)
    fig = Figure(figsize=(4.4 * len(panels), 4.2), dpi=100)
    axes = fig.subplots(1, len(panels))
    width = 0.8 / max(1, len(precisions))
    for ax, (metric, title, scale) in zip(axes, panels):
        for j, precision in enumerate(precisions):
            xs, heights, errs = [], [], [[], []]
            for i, (dev, impl, _) in enumerate(groups):
                cell = dev.precisions.get(precision, {}).get(impl)
                figure_ = _figure(cell, metric) if cell else None
                if not figure_ or (metric == "peak_memory_bytes" and dev.on_cpu):
                    continue
                mid, lo, hi = _bar(figure_)
                xs.append(i + (j - (len(precisions) - 1) / 2) * width)
                heights.append(mid / scale)
                errs[0].append((mid - lo) / scale)
                errs[1].append((hi - mid) / scale)
            ax.bar(xs, heights, width, yerr=errs, capsize=3, label=_text(precision))
        for i, (dev, impl, _) in enumerate(groups):
            if not any(impl in per and per[impl].ok for per in dev.precisions.values()):
                ax.text(
                    i,
                    0,
                    "not run\n(see report.md)",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="0.4",
                )
        # "plain (control)", "apex (O1)": the qualifier on a line of its own
        ax.set_xticks(range(len(groups)), [g[2].replace(" (", "\n(") for g in groups])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # no bar at all: no legend either
        axes[0].legend(loc="lower left", fontsize=8, framealpha=0.9)
    devices = _text(", ".join(dev.device for dev in summary.devices))
    title = (
        f"ampcompare on {devices}: step time with its 95% interval; memory and "
        f"accuracy median [min–max]"
    )
    # wrapped to the figure's width: a long list of devices and settings must not push the
    # panels off it
    fig.suptitle(textwrap.fill(title, width=40 * len(panels)))
    with warnings.catch_warnings():  # labels that still do not fit: drawn as they are
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return fig


def _groups(summary: Summary) -> tuple[list, list]:
    """The bar groups, (device, impl, label) each, and the precisions, in the report's order."""
    groups, precisions = [], []
    for dev in summary.devices:
        for precision, impls in dev.precisions.items():
            if precision not in precisions:
                precisions.append(precision)
            for impl in impls:
                label = _text(impl if len(summary.devices) == 1 else f"{impl}\n{dev.device}")
                if not any(d is dev and i == impl for d, i, _ in groups):
                    groups.append((dev, impl, label))
    return groups, precisions


def _text(value) -> str:
    """A value from a record as text matplotlib shows as it is: a "$" is not mathtext, and a
    character its font has no glyph for (CJK, emoji) is a "?" instead of a missing-glyph
    warning."""
    glyphs = _glyphs()
    return "".join(c if c == "\n" or ord(c) in glyphs else "?" for c in str(value)).replace(
        "$", r"\$"
    )


@functools.lru_cache(maxsize=1)
def _glyphs() -> frozenset:
    from matplotlib import font_manager, ft2font

    return frozenset(
        ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap()
    )


def _figure(cell: Cell, metric: str):
    return cell.step_time_s if metric == "step_time_s" else cell.metrics.get(metric)


def _bar(figure_) -> tuple[float, float, float]:
    """(height, low, high): an estimate and its interval, or a median and its min and max."""
    if isinstance(figure_, stats.Estimate):
        return figure_.value, figure_.lo, figure_.hi
    return figure_.median, figure_.min, figure_.max


def write(summary: Summary, path: str) -> None:
    """benchmark.png, written atomically."""
    fig = figure(summary)
    files.write_file(path, lambda f: fig.savefig(f, format="png"), binary=True)
