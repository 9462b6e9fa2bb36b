"""benchmark.png: grouped bars like the reference benchmark's chart — memory, epoch time and
accuracy per implementation and precision, median over repeats with min–max error bars."""
from __future__ import annotations

from common import results

MIB = 2 ** 20


def figure(summary):
    """The chart as a matplotlib Figure (no pyplot: nothing global is touched)."""
    from matplotlib.figure import Figure

    cpu = any(dev["env"].get("device") == "cpu" for dev in summary["devices"])
    memory = "peak memory (MiB)" + (": process RSS on CPU" if cpu else "")
    panels = (("peak_memory_bytes", memory, MIB),
              ("median_epoch_time_s", "epoch time (s)", 1.0),
              ("final_test_acc", "final test accuracy", 1.0))
    groups, precisions = [], []
    for dev in summary["devices"]:
        for precision, impls in dev["precisions"].items():
            if precision not in precisions:
                precisions.append(precision)
            for impl in impls:
                label = impl if len(summary["devices"]) == 1 else f"{impl}\n{dev['device']}"
                if (dev, impl, label) not in groups:
                    groups.append((dev, impl, label))
    fig = Figure(figsize=(13, 4.2), dpi=100)
    axes = fig.subplots(1, len(panels))
    width = 0.8 / max(1, len(precisions))
    for ax, (metric, title, scale) in zip(axes, panels):
        for j, precision in enumerate(precisions):
            xs, heights, errs = [], [], [[], []]
            for i, (dev, impl, _) in enumerate(groups):
                spread = dev["precisions"].get(precision, {}).get(impl, {}).get(metric)
                if not spread:
                    continue
                med = spread["median"] / scale
                xs.append(i + (j - (len(precisions) - 1) / 2) * width)
                heights.append(med)
                errs[0].append(med - spread["min"] / scale)
                errs[1].append(spread["max"] / scale - med)
            ax.bar(xs, heights, width, yerr=errs, capsize=3, label=precision)
        for i, (dev, impl, _) in enumerate(groups):
            if not any((cell.get(impl) or {}).get("ok") for cell in dev["precisions"].values()):
                ax.text(i, 0, "not run\n(see report.md)", ha="center", va="bottom", fontsize=8,
                        color="0.4")
        ax.set_xticks(range(len(groups)), [g[2] for g in groups])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right")
    devices = ", ".join(dev["device"] for dev in summary["devices"])
    fig.suptitle(f"ampcompare on {devices}: median over repeats, error bars min–max")
    fig.tight_layout()
    return fig


def write(summary, path: str) -> None:
    fig = figure(summary)
    results.write_file(path, lambda f: fig.savefig(f, format="png"), binary=True)
