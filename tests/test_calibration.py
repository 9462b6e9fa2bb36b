"""The verdicts' error rates, on runs recorded on this machine
(tests/data/calibration-runs.json: 32 runs of the plain loop at the demo's settings, 16 a
precision, in the order they ran).
Every run is of the same arm, so every difference a split of them claims is a false one; a
slowdown made in one group is a real one. These tests guard every change to ampcompare/stats.py:
the rates stated in docs/benchmark.md ("How sure is a verdict") are the ones kept here."""

import json
import pathlib

import pytest

from ampcompare import analysis, calibrate
from record import summary
from record.results import RunResult
from ampcompare import stats

FIXTURE = pathlib.Path(__file__).parent / "data" / "calibration-runs.json"
DEMO_REPEATS = 3  # the Makefile's demo runs --repeats 3
SLACK = 0.02  # the rates of one set of 16 runs carry its luck: splits are not independent
SPLITS = 200


def recorded():
    """The fixture's runs as records that report and calibrate read."""
    runs = json.loads(FIXTURE.read_text())["runs"]
    records = []
    for i, run in enumerate(runs):
        epochs = [
            {"epoch": e, "peak_memory_bytes": 1, "test_acc": 0.5, **row}
            for e, row in enumerate(run["epochs"])
        ]
        control = run["role"] == "control"
        records.append(
            RunResult.from_dict(
                {
                    "run_id": f"plain{'-control' if control else ''}-{run['precision']}-r{i}",
                    "impl": "plain",
                    "repeat": run["repeat"],
                    "seed": 0,
                    "status": "ok",
                    "precision": {"requested": run["precision"], "effective": run["precision"]},
                    "opt_level": None,
                    "config": {"role": run["role"], "position": run["position"]},
                    "env": {"device": "cpu", "device_name": "CPU", "threads": 2},
                    "epochs": epochs,
                    "summary": summary.summarize(epochs),
                }
            )
        )
    return records


@pytest.fixture(scope="module")
def cells():
    return list(calibrate.cells_of(recorded()).values())


def test_the_fixture_is_what_it_says():
    found = calibrate.cells_of(recorded())
    assert sorted(found) == ["plain 32-true", "plain bf16-mixed"]
    assert all(len(runs) == 16 for runs in found.values())
    assert all(r.fewest_steps >= stats.MIN_STEPS for runs in found.values() for r in runs)


@pytest.mark.parametrize("k", sorted({2, DEMO_REPEATS, 3, 4}))
def test_false_differences_stay_at_the_stated_level(cells, k):
    rate = calibrate.rate(cells, k, 0.0, SPLITS)
    assert rate.trials == 2 * SPLITS and rate.undecided == 0
    assert rate.share <= 1 - stats.LEVEL + SLACK, rate


@pytest.mark.parametrize(
    "k,slowdown,found",
    [(3, 0.20, 0.90), (3, 0.10, 0.25), (8, 0.05, 0.35), (8, 0.10, 0.90)],
)
def test_a_slowdown_is_found_at_least_as_often_as_stated(cells, k, slowdown, found):
    rate = calibrate.rate(cells, k, slowdown, SPLITS)
    assert rate.share >= found, rate


def test_a_pooled_variance_alone_would_claim_too_often(cells):
    # What the method guards against: judging every pair by the variance pooled over the
    # whole comparison. The bf16 runs here are noisier than the fp32 ones, and at 2 runs a
    # group the pooled variance claims a difference far more often than 5%.
    claimed = trials = 0
    for a, b in calibrate.splits(16, 2, SPLITS):
        groups = [
            (stats.Sample.join([c[i] for i in a]), stats.Sample.join([c[i] for i in b]))
            for c in cells
        ]
        noise = stats.Noise.pooled([g for pair in groups for g in pair])
        for first, second in groups:
            d, _, _ = stats.log_ratio(second, first, noise)
            se = (noise.variance * (1 / 2 + 1 / 2)) ** 0.5
            half = stats.t_quantile((1 + stats.LEVEL) / 2, noise.df) * se
            claimed += abs(d) > half
            trials += 1
    assert claimed / trials > 1 - stats.LEVEL + SLACK
    assert calibrate.rate(cells, 2, 0.0, SPLITS).share <= 1 - stats.LEVEL + SLACK


def test_fewer_steps_than_the_minimum_give_no_verdict(cells):
    short = calibrate.cells_of(recorded(), steps=stats.MIN_STEPS - 1)
    rate = calibrate.rate(list(short.values()), 3, 0.5, 20)
    assert rate.claimed == 0 and rate.undecided == rate.trials
    # and calibrate says so, rather than a rate that rests on no verdict
    assert "no verdict drawn in 40 comparisons" in calibrate.table(short, {3: (rate, None)})


def test_the_report_judges_a_pair_as_calibrate_does(cells):
    # The report over the fixture: plain against its control must not claim a difference.
    group = analysis.summarize(recorded()).devices[0]
    for precision in ("32-true", "bf16-mixed"):
        control = group.overheads[precision][analysis.CONTROL]
        assert not control.estimate.claims(0.0)
        assert control.verdict.startswith("plain against itself: no difference detectable")
    speedup = group.ratios["plain"]["bf16-mixed"].speedup
    assert speedup.verdict.endswith("]") and "faster" in speedup.verdict


def test_a_table_of_verdicts_claims_falsely_at_most_at_the_stated_level(cells):
    # The demo's table of what each framework adds: 4 arms against plain (Lightning, Fabric,
    # Accelerate, the control) at 2 precisions, 3 runs each, drawn from the recorded runs.
    # Its rows are judged together (each at stats.family(8)): a table with any false claim
    # stays under 5%. Row by row at 95% each, 8 rows claimed something false far more often.
    false, _ = calibrate.table_rate(cells, DEMO_REPEATS, 4, 300)
    assert false <= 1 - stats.LEVEL + SLACK
    _, found = calibrate.table_rate(cells, DEMO_REPEATS, 4, 200, slowdown=0.30)
    assert found >= 0.5  # a 30% slower arm is still found, at least half the time
