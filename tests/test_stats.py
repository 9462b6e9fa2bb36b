"""Timing figures that can be trusted: the bootstrap's intervals and verdicts against step times
built by hand (a known difference, a known null, bursts, runs that differ), the report's
ratios and notes on hand-made records, and the meters' step times in every arm."""

import copy
import re

import numpy as np
import pytest
import torch

from ampcompare import analysis, report
from common import metrics
from record import summary
from record.results import Precision, RunResult
from ampcompare import stats
from fabric_impl import train as fabric
from lightning_impl import train as lightning
from plain_torch import train as plain
from tests.conftest import tiny


def noisy(level, n=200, seed=0, noise=0.02):
    """n step times around `level` seconds, with independent noise of `noise` (relative)."""
    return list(level * (1 + noise * np.random.default_rng(seed).standard_normal(n)))


def runs_of(level, count, seed, between=0.03, n=60):
    """`count` runs around `level`, each process off by its own share (sd `between`)."""
    rng = np.random.default_rng(seed)
    return [
        noisy(level * np.exp(between * rng.standard_normal()), n, seed * 100 + i)
        for i in range(count)
    ]


@pytest.mark.parametrize(
    "df,quantile",  # Student's t at 0.975, from the printed tables
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (8, 2.306), (10, 2.228), (30, 2.042)],
)
def test_t_quantiles_match_the_tables(df, quantile):
    assert stats.t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-4)


def test_a_known_difference_is_found_and_said():
    a = stats.Sample(runs_of(0.26, 4, 1), "32")
    b = stats.Sample(runs_of(0.20, 4, 2), "mixed")
    noise = stats.Noise.pooled([a, b])
    est = stats.ratio(a, b, noise)
    assert est.short is None and est.df == 6
    assert 1.1 < est.lo < est.value < est.hi < 1.5 and est.contains(1.3)
    words = stats.speed_words(est)
    assert "× faster [" in words and words.endswith("]")
    assert "× slower [" in stats.speed_words(stats.ratio(b, a, noise))


def test_a_known_null_is_no_difference_detectable():
    a = stats.Sample(runs_of(0.2, 3, 3), "a")
    b = stats.Sample(runs_of(0.2, 3, 4), "b")
    est = stats.ratio(a, b, stats.Noise.pooled([a, b]))
    assert est.contains(1.0) and est.short is None
    assert stats.speed_words(est).startswith("no difference detectable [")
    assert stats.time_ratio_words(est).startswith("no difference detectable [")


def test_the_same_records_give_the_same_interval():
    runs = runs_of(0.2, 2, 5)
    first = stats.level(stats.Sample(runs, "x"), stats.NO_NOISE)
    assert stats.level(stats.Sample([list(r) for r in runs], "x")) == first


def test_runs_that_differ_widen_the_interval_beyond_one_runs():
    # Three runs whose levels differ by 10% (fresh processes on a noisy machine): the figure's
    # interval must cover that spread, which one run's steps alone cannot show.
    between = stats.Sample([noisy(0.2, seed=1), noisy(0.22, seed=2), noisy(0.18, seed=3)], "b")
    one = stats.Sample([noisy(0.2, seed=1)], "one")
    wide = stats.level(between, stats.Noise.pooled([between]))
    narrow = stats.level(one)
    assert wide.hi - wide.lo > 3 * (narrow.hi - narrow.lo)
    assert wide.lo < 0.19 and wide.hi > 0.21


def test_the_noise_pooled_over_a_comparison_reaches_a_cell_of_one_run():
    # One run of this cell, but other cells measured how far a process strays: the cell's
    # interval is as wide as that, not as narrow as its own steps.
    others = [stats.Sample(runs_of(0.1 * (i + 1), 3, 10 + i, between=0.05)) for i in range(4)]
    noise = stats.Noise.pooled(others)
    one = stats.Sample([noisy(0.2, seed=9, noise=0.001)])
    assert noise.df == 8
    est = stats.level(one, noise)
    assert est.hi / est.lo > 1.05 > stats.level(one).hi / stats.level(one).lo


def test_a_burst_of_slow_steps_is_not_counted_as_independent_evidence():
    # The same step times twice: in order (a burst: 60 slow steps in a row, as this machine's
    # noise comes) and shuffled. Blocks of consecutive steps make the bursty run's interval
    # wider.
    rng = np.random.default_rng(0)
    steps = np.concatenate(
        [0.2 + 0.002 * rng.standard_normal(140), 0.3 + 0.002 * rng.standard_normal(60)]
    )
    bursty = stats.level(stats.Sample([steps], "bursty"))
    shuffled = stats.level(stats.Sample([rng.permutation(steps)], "shuffled"))
    assert bursty.hi - bursty.lo > 1.5 * (shuffled.hi - shuffled.lo)


@pytest.mark.parametrize("seed", range(30))
def test_a_cells_interval_holds_its_own_estimate(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 5))
    runs = [
        list(rng.lognormal(np.log(0.2), rng.uniform(0.001, 1.0), int(rng.integers(1, 40))))
        for _ in range(count)
    ]
    sample = stats.Sample(runs, str(seed))
    for est in (stats.level(sample), stats.level(sample, stats.Noise.pooled([sample]))):
        assert est.lo <= est.value <= est.hi
        text = stats.duration_with_interval(est)
        if min(len(run) for run in runs) < stats.MIN_STEPS:
            assert text.endswith(" [too few steps]"), text
            continue
        value, lo, hi = (
            float(x)
            for x in text.replace("[", "").replace("]", "").replace("–", " ").split()[::2][:1]
            + text.split("[")[1].rstrip("]").split("–")
        )
        assert lo <= value <= hi, text


def test_one_run_a_cell_gives_figures_but_no_verdict():
    a, b = stats.Sample([[0.3] * 20]), stats.Sample([[0.1] * 20])
    est = stats.ratio(a, b, stats.Noise.pooled([a, b]))
    assert est.short.startswith("not enough runs to tell: 1 run a cell, need ≥ 2")
    assert not est.claims(1.0)
    words = stats.speed_words(est)
    assert words.startswith("not enough runs to tell") and "measured 3.0" in words
    assert "faster" not in words and "slower" not in words
    cost = stats.overhead_words(stats.difference(a, b), 0.1)
    assert cost.startswith("not enough runs to tell") and "measured +200.0 ms" in cost


def test_too_few_steps_a_run_give_no_verdict():
    few = stats.MIN_STEPS - 1
    a = stats.Sample([noisy(0.3, few, s) for s in range(4)])
    b = stats.Sample([noisy(0.1, few, 10 + s) for s in range(4)])
    est = stats.ratio(a, b, stats.Noise.pooled([a, b]))
    assert est.short.startswith(f"not enough steps to tell: a run has {few} timed steps")
    assert not est.claims(1.0)
    more = stats.Sample([noisy(0.3, stats.MIN_STEPS, s) for s in range(4)])
    assert stats.ratio(more, stats.Sample([noisy(0.1, stats.MIN_STEPS, 9)] * 4)).claims(1.0)


def test_figures_from_several_processes_pool_across_them():
    # Three processes put a cost at 300, 900 and 600 µs, each sure of its own to ±50: the
    # pooled interval covers all three (t with 2 degrees of freedom), not ±50.
    mean, half, df = stats.across([300e-6, 900e-6, 600e-6], [(25e-6) ** 2] * 3)
    assert df == 2 and mean == pytest.approx(600e-6)
    assert mean - half < 300e-6 and mean + half > 900e-6
    # Processes that agree: the within part keeps the interval from collapsing.
    mean, half, _ = stats.across([1.0, 1.0, 1.0], [0.01**2] * 3)
    assert half == pytest.approx(1.96 * 0.01 / 3**0.5, rel=1e-3)


def test_rounds_measured_side_by_side_cancel_what_a_round_did_to_both():
    levels = [0.2, 0.3, 0.25, 0.22, 0.28, 0.21]
    a = stats.Sample([noisy(v, 40, seed=i, noise=0.005) for i, v in enumerate(levels)], "a")
    b = stats.Sample(
        [noisy(v * 1.05, 40, seed=10 + i, noise=0.005) for i, v in enumerate(levels)], "b"
    )
    d, var = stats.paired_logs(b, a)
    assert np.exp(d) == pytest.approx(1.05, abs=0.005) and var**0.5 < 0.003
    with pytest.raises(ValueError):
        stats.paired_logs(b, stats.Sample(a.runs[:3], "short"))


@pytest.mark.parametrize(
    "est,words",
    [
        (stats.Estimate(1.31, 1.25, 1.38), "1.31× faster [1.25–1.38]"),
        (stats.Estimate(1.002, 0.97, 1.04), "no difference detectable [0.97–1.04]"),
        (stats.Estimate(0.8, 0.78, 0.82), "1.25× slower [1.22–1.28]"),
        (stats.Estimate(1.004, 1.001, 1.007), "1.004× faster [1.001–1.007]"),
    ],
)
def test_speed_words(est, words):
    assert stats.speed_words(est) == words


@pytest.mark.parametrize(
    "est,words",
    [
        (
            stats.Estimate(812e-6, 690e-6, 930e-6),
            "+812 µs a step [+690, +930], 0.33% of plain's 246 ms step",
        ),
        (
            stats.Estimate(30e-6, -80e-6, 150e-6),
            "no difference detectable [−80, +150] µs a step, against plain's 246 ms",
        ),
        (
            stats.Estimate(-20e-3, -30e-3, -10e-3),
            "−20.0 ms a step [−30.0, −10.0]: plain's steps took longer here (246 ms)",
        ),
    ],
)
def test_overhead_words(est, words):
    assert stats.overhead_words(est, 0.246) == words


@pytest.mark.parametrize(
    "est,target,at_most,words",
    [
        (stats.Estimate(2.5, 2.2, 2.8), 2.0, False, "meets ≥ 2.0"),
        (stats.Estimate(1.5, 1.4, 1.6), 2.0, False, "misses ≥ 2.0"),
        (stats.Estimate(2.0, 1.9, 2.1), 2.0, False, "cannot tell"),
    ],
)
def test_targets_are_judged_on_the_whole_interval(est, target, at_most, words):
    assert stats.target_words(est, target, at_most).startswith(words)


# --- the report, on records built by hand --------------------------------------------------


def record(impl, precision, steps_by_run_epoch, run, weights="w", role="arm"):
    """A run record whose epochs hold the given step times (the first epoch a warm-up)."""
    epochs = [
        {
            "epoch": i,
            "warmup": i == 0,
            "step_times_s": list(times),
            "train_loss": 1.0,
            "test_loss": 1.0,
            "test_acc": 0.5,
            "epoch_time_s": 1.0,
            "train_time_s": 1.0,
            "images_per_s": 1.0,
            "data_wait_s": 0.0,
            "peak_memory_bytes": 1,
        }
        for i, times in enumerate(steps_by_run_epoch)
    ]
    return RunResult.from_dict(
        {
            "run_id": f"{impl}-{precision}-r{run}",
            "impl": impl,
            "seed": 0,
            "repeat": run,
            "status": "ok",
            "precision": {"requested": precision, "effective": precision},
            "opt_level": None,
            "config": {"model": "small", "role": role},
            "weights_sha256": weights,
            "env": {"device": "cpu", "device_name": "CPU"},
            "epochs": epochs,
            "summary": summary.summarize(epochs),
        }
    )


def group_of(records):
    (group,) = analysis.summarize(records).devices
    return group


def test_the_report_finds_a_known_speedup_and_a_known_null():
    records = []
    for run in range(2):
        for impl, extra in (("plain", 0.0), ("lightning", 0.0)):
            records.append(
                record(
                    impl,
                    "32-true",
                    [noisy(0.3, 20, run), noisy(0.2 + extra, 50, seed=run)],
                    run,
                    weights=f"w32-{run}",
                )
            )
            records.append(
                record(
                    impl,
                    "bf16-mixed",
                    [noisy(0.3, 20, run), noisy(0.1, 50, seed=9 + run)],
                    run,
                    weights=f"w16-{run}",
                )
            )
    group = group_of(records)
    speed = group.ratios["plain"]["bf16-mixed"].speedup
    # independently: the mean over runs of each run's median timed step
    medians = {
        p: np.mean(
            [
                np.median(r.epochs[1]["step_times_s"])
                for r in records
                if (r.impl, r.precision.effective) == ("plain", p)
            ]
        )
        for p in ("32-true", "bf16-mixed")
    }
    expected = medians["32-true"] / medians["bf16-mixed"]
    lo, hi = speed.estimate.lo, speed.estimate.hi
    assert speed.estimate.value == pytest.approx(expected) and 1.9 < lo < expected < hi < 2.1
    assert speed.verdict.startswith(f"{expected:.2f}× faster [")
    cost = group.overheads["32-true"]["lightning"]
    assert cost.estimate.lo < 0 < cost.estimate.hi
    assert cost.verdict.startswith("no difference detectable")
    assert not any("do not overlap" in n for n in group.notes)
    md = report.markdown(analysis.summarize(records), records)
    assert speed.verdict in md and "no difference detectable [" in md
    assert "One run per cell" not in md


def test_one_run_per_cell_says_what_its_interval_covers():
    records = [
        record("plain", p, [noisy(0.3, 20), noisy(t, 50)], 0)
        for p, t in (("32-true", 0.2), ("bf16-mixed", 0.1))
    ]
    notes = group_of(records).notes
    assert any("One run per cell" in n and "--repeats" in n for n in notes)


def test_identical_arithmetic_with_speedups_that_do_not_overlap_is_called_noise():
    # plain and Lightning trained the same weights, yet one got 2x and the other 1.5x.
    records = []
    for impl, mixed in (("plain", 0.1), ("lightning", 0.1333)):
        records.append(
            record(
                impl,
                "32-true",
                [[0.3] * 5, noisy(0.2, 100, seed=1, noise=0.001)],
                0,
                weights="same-32",
            )
        )
        records.append(
            record(
                impl,
                "bf16-mixed",
                [[0.3] * 5, noisy(mixed, 100, seed=2, noise=0.001)],
                0,
                weights="same-16",
            )
        )
    notes = group_of(records).notes
    assert any(
        "plain and lightning trained bitwise-identical weights" in n and "noise exceeded" in n
        for n in notes
    ), notes
    # Different weights: not the same arithmetic, nothing to say.
    records[-1].weights_sha256 = "other"
    assert not any("noise exceeded" in n for n in group_of(records).notes)


def test_a_one_epoch_run_leaves_out_its_first_steps():
    steps = [1.0] * summary.WARMUP_STEPS + [0.2] * 20
    timed, rule = summary.timed_steps([{"warmup": True, "step_times_s": steps}])
    assert timed == [0.2] * 20 and "first" in rule
    timed, rule = summary.timed_steps(
        [
            {"warmup": True, "step_times_s": [1.0] * 3},
            {"warmup": False, "step_times_s": [0.2] * 4},
        ]
    )
    assert timed == [0.2] * 4 and "warm-up epochs left out" in rule


# --- the meters ----------------------------------------------------------------------------


@pytest.mark.parametrize("arm", [plain, lightning, fabric])
def test_every_arm_records_a_time_and_a_wait_per_step(tmp_path, arm):
    result = arm.train(tiny(tmp_path, epochs=2))
    for e in result.epochs:
        assert len(e["step_times_s"]) == len(e["step_waits_s"]) == e["steps"] == 3
        assert all(t > 0 for t in e["step_times_s"])
        assert e["step_clock"] == "perf_counter"
        # a step's time holds its wait: together they cannot exceed the training time
        assert sum(e["step_times_s"]) <= e["train_time_s"]
        assert sum(e["step_waits_s"]) == pytest.approx(e["data_wait_s"])
    s = result.summary
    assert (
        s["timed_steps"] == 3
        and s["step_time_q1_s"] <= s["median_step_time_s"] <= s["step_time_q3_s"]
    )
    assert result.env["steady_malloc"] is True  # glibc here: the same allocator for every arm


class StandInEvent:
    """torch.cuda.Event's interface, on a CPU: a stamp on a fake stream clock."""

    clock, made, synced = 0.0, [], False

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None
        StandInEvent.made.append(self)

    def record(self):
        self.at = StandInEvent.clock

    def elapsed_time(self, end):  # milliseconds, as CUDA's; only once the stream is synced
        assert StandInEvent.synced, "read before the epoch's synchronize"
        return (end.at - self.at) * 1e3


def test_the_cuda_clock_stamps_each_step_without_a_sync(monkeypatch):
    monkeypatch.setattr(metrics.CudaClock, "Event", StandInEvent)
    monkeypatch.setattr(StandInEvent, "made", [])
    monkeypatch.setattr(metrics, "clock", lambda device: metrics.CudaClock())
    synced = []
    monkeypatch.setattr(metrics, "synchronize", lambda device: synced.append(True))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = metrics.EpochMeter(torch.device("cpu"), 1, metrics.StepCounter(optimizer))
    syncs_at_start = len(synced)
    for took in (0.010, 0.020, 0.015):
        StandInEvent.clock += 0.001  # the wait for the batch
        meter.batch_start()
        StandInEvent.clock += took
        meter.step(torch.tensor(1.0), 4)
    assert len(synced) == syncs_at_start  # no sync per step
    assert len(StandInEvent.made) == 4  # one stamp to start, one at each step's end
    meter.train_done()
    StandInEvent.synced = True
    try:
        row, _ = meter.finish(None)
    finally:
        StandInEvent.synced = False
    assert row["step_clock"] == "cuda events"
    # the first step from its batch start; later ones from the end of the step before
    assert row["step_times_s"] == pytest.approx([0.010, 0.021, 0.016])


def test_old_records_without_step_times_still_report(tmp_path):
    rec = record("plain", "32-true", [[0.3] * 5, [0.2] * 5], 0)
    old = copy.deepcopy(rec)
    for e in old.epochs:
        del e["step_times_s"]
    old.summary = summary.summarize(old.epochs)
    old.precision = Precision("bf16-mixed", "bf16-mixed")
    group = group_of([rec, old])
    assert group.precisions["bf16-mixed"]["plain"].step_time_s is None
    assert group.ratios["plain"]["bf16-mixed"].speedup is None
    assert "– (no step times)" in report.markdown(analysis.summarize([rec, old]), [rec, old])


def comparison(costs, weights=None, runs=3, level=0.1):
    """Records of plain and the arms in `costs` ({label: factor on plain's step}) at 32-true and
    bf16-mixed (half the time), `runs` repeats each with a little noise between processes;
    "plain (control)" is the plain loop again."""
    records = []
    rng = np.random.default_rng(0)
    for run in range(runs):
        for label, factor in {"plain": 1.0, **costs}.items():
            impl, role = ("plain", "control") if label == "plain (control)" else (label, "arm")
            for precision, scale in (("32-true", 1.0), ("bf16-mixed", 0.5)):
                level_ = level * scale * factor * np.exp(0.005 * rng.standard_normal())
                steps = noisy(level_, 30, seed=run * 31 + len(records), noise=0.002)
                w = (weights or {}).get(label, label) + precision
                records.append(
                    record(impl, precision, [[0.3] * 5, steps], run, weights=w, role=role)
                )
    return records


def test_a_control_that_claims_a_difference_withholds_every_verdict():
    records = comparison({"plain (control)": 1.2, "lightning": 1.0})
    group = group_of(records)
    assert group.control_claims
    md = report.markdown(analysis.summarize(records), records)
    assert md.splitlines()[4].startswith("**This machine's noise exceeded the method here**")
    speed = group.ratios["plain"]["bf16-mixed"].speedup.verdict
    assert speed.startswith("no verdict: plain against itself showed a difference here")
    assert "faster" not in speed and "; measured 1.9" in speed or "; measured 2.0" in speed
    cost = group.overheads["32-true"]["lightning"].verdict
    assert cost.startswith("no verdict") and "measured" in cost


def test_a_quiet_control_leaves_the_verdicts_standing():
    records = comparison({"plain (control)": 1.0, "lightning": 1.0})
    group = group_of(records)
    assert not group.control_claims
    control = group.overheads["32-true"]["plain (control)"].verdict
    assert control.startswith("plain against itself: no difference detectable [")
    assert "× faster [" in group.ratios["plain"]["bf16-mixed"].speedup.verdict
    assert "noise exceeded the method" not in report.markdown(
        analysis.summarize(records), records
    )


@pytest.mark.parametrize(
    "factor,says", [(1.3, "framework's own work"), (0.7, "cannot take less")]
)
def test_the_same_weights_with_a_claimed_cost_get_a_note(factor, says):
    same = {"lightning": "plain"}  # lightning trained plain's weights, bit for bit
    records = comparison({"plain (control)": 1.0, "lightning": factor}, weights=same)
    notes = group_of(records).notes
    assert any(
        "lightning trained bitwise-identical weights to plain's" in n and says in n
        for n in notes
    ), notes
    other = comparison({"plain (control)": 1.0, "lightning": factor})  # other weights
    assert not any("identical weights to plain's" in n for n in group_of(other).notes)


def test_the_explanation_never_contradicts_the_speedup():
    # fp16 on a CPU is usually far slower; where it measured faster, the line beside it must
    # not say "slower".
    records = [r for r in comparison({}) if True]
    for r in records:
        if r.precision.effective == "bf16-mixed":
            r.precision = Precision("16-mixed", "16-mixed")
    group = group_of(records)
    (line,) = group.explanations
    assert "faster" in line and "slower" not in line and "no fast fp16 kernels" in line
    for r in records:  # and where it measured slower, it says why
        if r.precision.effective == "16-mixed":
            for e in r.epochs:
                e["step_times_s"] = [t * 8 for t in e["step_times_s"]]
            r.summary = summary.summarize(r.epochs)
    (line,) = group_of(records).explanations
    assert "which is why fp16 ran slower than fp32 here" in line
    for r in records:  # 16-true is fp16 too: never the bf16 sentence
        if r.precision.effective == "16-mixed":
            r.precision = Precision("16-true", "16-true")
    (line,) = group_of(records).explanations
    assert "no fast fp16 kernels" in line and "bf16" not in line


def test_only_the_plain_loop_is_a_control():
    """A record of another arm that says role control (run so by hand) is that arm's row, never
    plain's noise floor."""
    records = comparison({"lightning": 1.0})
    for r in records:
        if r.impl == "lightning":
            r.config["role"] = "control"
    labels = {analysis.arm_of(r) for r in records}
    assert labels == {"plain", "lightning"}
    assert not group_of(records).control_claims


def _placed_runs(steps: int, slope: float, repeats: int = 6):
    """Stand-in records of two arms over `repeats` repeats, each run `steps` timed steps long,
    each later place in a repeat's order `slope` slower; and their cells' samples."""
    rng = np.random.default_rng(0)
    records = []
    for repeat in range(repeats):
        for position, impl in enumerate(
            ("plain", "fabric") if repeat % 2 else ("fabric", "plain")
        ):
            times = list(0.1 * (1 + slope) ** position * rng.lognormal(0, 0.001, steps))
            records.append(
                RunResult.stand_in(
                    "32-true",
                    run_id=f"{impl}-{repeat}",
                    impl=impl,
                    repeat=repeat,
                    seed=0,
                    status="ok",
                    error=None,
                    opt_level=None,
                    env={},
                    config={"position": position},
                    epochs=[{"warmup": False, "step_times_s": times}],
                )
            )
    samples = {
        ("32-true", impl): analysis.sample_of([r for r in records if r.impl == impl], impl)
        for impl in ("plain", "fabric")
    }
    return records, samples


def test_run_order_is_found_where_it_is_and_not_claimed_from_too_few_steps():
    records, samples = _placed_runs(stats.MIN_STEPS, 0.05)
    found = analysis.order_effect(records, samples, stats.NO_NOISE)
    assert found.verdict.startswith("order mattered") and 0.04 < found.estimate < 0.06
    records, samples = _placed_runs(stats.MIN_STEPS, 0.0)
    assert (
        "no effect of run order detectable"
        in analysis.order_effect(records, samples, stats.NO_NOISE).verdict
    )
    records, samples = _placed_runs(stats.MIN_STEPS - 1, 0.05)
    few = analysis.order_effect(records, samples, stats.NO_NOISE).verdict
    assert few.startswith("not enough steps to tell whether order mattered: a run has 5 timed")


def test_a_time_from_too_few_steps_shows_no_interval():
    one = stats.level(stats.Sample([[0.0335]]))
    assert stats.duration_with_interval(one) == "33.5 ms [too few steps]"
    many = stats.level(stats.Sample([noisy(0.0335, stats.MIN_STEPS, 1)]))
    assert re.fullmatch(r"33\.\d ms \[\d\d\.\d–\d\d\.\d\]", stats.duration_with_interval(many))


def test_a_report_of_no_records_says_nothing_was_measured():
    md = report.markdown(analysis.summarize([]), [])
    assert "nothing was measured" in md
    assert "nothing was measured" not in report.markdown(
        analysis.summarize(comparison({})), comparison({})
    )
