"""compare and report, end to end on CPU: 2 impls x 2 precisions x 2 repeats, one arm made to
fail on purpose in its child processes (tests/faults.py)."""

import csv
import json
import os
import pathlib
import signal

import pytest
from click.testing import CliRunner

from ampcompare import analysis, compare, plan, report
from ampcompare.cli import cli, common_options, config_from
from record.results import RunResult
from common.config import Config
from tests import faults
from tests.conftest import SMALL_RUN, start_plain_compare

ARGS = [*SMALL_RUN, "--epochs", "2", "--limit-train-batches", "2"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    mp = pytest.MonkeyPatch()
    faults.inject_children(mp, epoch=0, action="raise", argv=("lightning", "bf16-mixed"))
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            *ARGS,
            "--impls",
            "plain,lightning,apex",
            "--precisions",
            "32,bf16",
            "--repeats",
            "2",
            "--out-dir",
            str(tmp / "runs"),
        ],
    )
    mp.undo()
    folders = list((tmp / "runs").iterdir())
    assert len(folders) == 1, result.output
    return result, folders[0]


def csv_rows(folder) -> list[dict]:
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def md_table(markdown: str, heading: str) -> list[dict]:
    """The first table under `heading` in a Markdown text, as one dict per row."""
    lines = markdown[markdown.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    header, _, *body = table
    return [dict(zip(header, row)) for row in body]


def test_compare_writes_every_file(compared):
    result, folder = compared
    assert result.exit_code == 1, result.output  # one arm failed; everything else was kept
    for name in ("results.csv", "summary.json", "report.md", "benchmark.png"):
        assert (folder / name).stat().st_size > 0
    rows = csv_rows(folder)
    assert len(rows) == 3 * 2 * 2 + 2 * 2  # and plain once more at each precision: the control
    assert "[1/16]" in result.stderr and "[16/16]" in result.stderr
    assert not (folder / compare.WARMUP).exists()  # the warm-up run leaves nothing
    assert not list(
        folder.glob("*/checkpoint*.pt")
    )  # compare measures, it keeps no checkpoints


def test_each_run_came_from_its_own_process(compared):
    _, folder = compared
    records = [r for r in analysis.load([folder]) if r.impl != "apex"]
    pids = [r.env["pid"] for r in records]
    assert len(records) == 12 and len(set(pids)) == 12 and os.getpid() not in pids


def test_a_failing_arm_is_a_row_and_the_rest_complete(compared):
    _, folder = compared
    rows = csv_rows(folder)
    status = {(r["impl"], r["precision"], r["repeat"]): r["status"] for r in rows}
    assert status[("lightning", "bf16-mixed", "0")] == "failed"
    assert status[("lightning", "bf16-mixed", "1")] == "failed"
    assert all(
        status[(i, p, k)] == "ok"
        for i, p in [("plain", "32-true"), ("plain", "bf16-mixed"), ("lightning", "32-true")]
        for k in "01"
    )
    failed = next(r for r in rows if r["status"] == "failed")
    assert "broken on purpose" in failed["error"]
    assert int(failed["epochs_done"]) == 0
    unfinished = md_table((folder / "report.md").read_text(), "## Runs that did not finish")
    row = next(r for r in unfinished if r["impl"] == "lightning")
    assert row["precision"] == "bf16-mixed" and row["status"] == "failed"
    assert set(row["runs"].split(", ")) == {
        "lightning-bf16-mixed-r0",
        "lightning-bf16-mixed-r1",
    }
    assert "broken on purpose" in row["why"]


def test_apex_unavailable_here_is_a_row_that_says_why(compared):
    # apex.amp cannot run without CUDA, so on the CPU machines this suite runs on it never runs.
    _, folder = compared
    rows = [r for r in csv_rows(folder) if r["impl"] == "apex"]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"unavailable"}
    assert all(("apex" in r["error"] or "CUDA" in r["error"]) for r in rows)
    assert "unavailable" in (folder / "report.md").read_text()


def test_an_arm_known_to_be_unavailable_starts_no_process(tmp_path, monkeypatch):
    started = []
    real = compare._attempt
    monkeypatch.setattr(
        compare, "_attempt", lambda cfg, arm, *a: started.append(arm.impl) or real(cfg, arm, *a)
    )
    command = ["compare", *ARGS, "--epochs", "1", "--impls", "apex,plain", "--no-control"]
    result = CliRunner().invoke(
        cli, [*command, "--precisions", "32,bf16", "--out-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert started == ["plain", "plain", "plain"]  # the warm-up and plain's two; apex none
    rows = {
        r["precision"]: r for r in csv_rows(next(tmp_path.iterdir())) if r["impl"] == "apex"
    }
    assert {r["status"] for r in rows.values()} == {"unavailable"}
    assert "apex.amp has no bf16 mode" in rows["bf16-mixed"]["error"]
    # without the apex wheel, or with it and no CUDA:
    assert rows["32-true"]["error"].startswith(
        ("apex is not installed", "apex.amp needs a CUDA")
    )


@pytest.mark.parametrize(
    "action, status", [("usage", "failed"), ("unavailable", "unavailable")]
)
def test_only_what_the_machine_lacks_makes_an_arm_unavailable(
    tmp_path, monkeypatch, action, status
):
    # A child's exit 2 (a full disk at start, a port in use) is that run's failure, with its
    # line; only what this machine cannot do at all (exit 3 towards compare) is "unavailable".
    faults.inject_children(monkeypatch, epoch=0, action=action, argv=("plain",))
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            *ARGS,
            "--epochs",
            "1",
            "--impls",
            "plain",
            "--precisions",
            "32",
            "--repeats",
            "2",
            "--no-control",
            "--out-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == (1 if status == "failed" else 0), result.output
    rows = csv_rows(next(tmp_path.iterdir()))
    assert [r["status"] for r in rows] == [status, status]
    assert all(
        r["error"] == f"{'refused' if action == 'usage' else 'unavailable'} on purpose"
        for r in rows
    )


def test_report_speedup_follows_from_the_csv(compared):
    # Independently of the report's code: each run's median step time, from results.csv; an
    # arm's step time is the geometric mean over its repeats, and the speed-up 32-true's over
    # bf16's.
    _, folder = compared
    rows = csv_rows(folder)

    def step_time(precision):
        times = [
            float(r["median_step_time_s"])
            for r in rows
            if (r["impl"], r["precision"], r["status"]) == ("plain", precision, "ok")
        ]
        assert len(times) == 2
        return (times[0] * times[1]) ** 0.5

    expected = step_time("32-true") / step_time("bf16-mixed")
    md = (folder / "report.md").read_text()
    ratios = md_table(md, "### Each precision against 32-true")
    row = next(r for r in ratios if (r["impl"], r["precision"]) == ("plain", "bf16-mixed"))
    speed = row["speed (32-true step time / its step time)"]
    if "; measured " in speed:  # two timed steps a run: figures, no verdict
        assert speed.startswith("not enough steps to tell")
        number, interval = speed.split("; measured ")[1].split("× [")
        lo, hi = map(float, interval.rstrip("]").split("–"))
        assert float(number) == pytest.approx(expected, abs=0.006) and lo <= expected <= hi
    elif speed.startswith("no difference"):
        lo, hi = map(float, speed.split("[")[1].rstrip("]").split("–"))
        assert lo <= expected <= hi
    else:
        number = float(speed.split("×")[0])
        assert number == pytest.approx(
            expected if "faster" in speed else 1 / expected, abs=0.006
        )
    assert "On CPU the mixed precision is bf16-mixed" in md
    why = [line for line in md.splitlines() if line.startswith("- bf16-mixed against 32-true")]
    assert len(why) == 1 and speed in why[0]
    assert "Reference: the benchmark this tool grew from" in md
    table = md_table(md, "### 32-true")
    assert [r["impl"] for r in table] == ["plain", "plain (control)", "lightning", "apex"]
    assert table[0]["runs ok"] == "2/2" and table[3]["runs ok"] == "0/2"
    costs = md_table(md, "### What each framework adds to a step")
    assert costs[0]["impl"] == "plain (control)"
    assert costs[0]["time added per step"].startswith("plain against itself: ")


def test_report_rebuilds_the_same_files(compared, tmp_path):
    _, folder = compared
    before = (folder / "report.md").read_text()
    r = CliRunner().invoke(cli, ["report", str(folder), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "report.md").read_text() == before
    assert (tmp_path / "again" / "results.csv").read_text() == (
        folder / "results.csv"
    ).read_text()


def test_report_groups_several_folders_by_device(compared, tmp_path):
    _, folder = compared
    other = tmp_path / "other-machine"
    for record in analysis.load([folder]):
        record.env.update(device_name="Other CPU", host="other")  # another machine
        run_dir = other / record.run_id
        run_dir.mkdir(parents=True)
        (run_dir / "result.json").write_text(json.dumps(record.to_dict()))
    records = analysis.load([folder, other])
    summary = analysis.summarize(records)
    devices = [d.device for d in summary.devices]
    assert len(devices) == 2 and devices[1] == "Other CPU (cpu)"
    paths = report.write(records, str(tmp_path / "both"))
    md = pathlib.Path(paths["report.md"]).read_text()
    assert md.count("## ") >= 2 and "Other CPU (cpu)" in md


def test_chart_is_an_image_with_the_three_panels(compared):
    from PIL import Image
    from ampcompare import chart

    _, folder = compared
    with Image.open(folder / "benchmark.png") as image:
        image.load()  # decodes every pixel: a truncated or garbled file fails here
        pixels = image.convert("L")
        assert pixels.getextrema()[0] < 128 < pixels.getextrema()[1]  # something is drawn
    summary = analysis.summarize(analysis.load([folder]))
    titles = [ax.get_title() for ax in chart.figure(summary).axes]
    assert titles == [
        "activation memory (MiB)",
        "step time (ms), 95% interval",
        "final test accuracy",
    ]


def as_record(entries):
    """A record holding these entries (the rest as an older record lacking them reads)."""
    ran = {"requested": "32-true", "effective": "32-true"}
    return entries and RunResult.from_dict({"precision": ran, **entries})


RUNNING = {"status": "running", "pid": 2, "epochs": [1]}
BEFORE = {"status": "interrupted", "pid": 1, "epochs": [1], "checkpoint": {"epochs": 1}}


@pytest.mark.parametrize(
    "before,after,code,last,interrupted,resuming,expected",
    [
        (None, None, 3, "no CUDA", False, False, ("stand-in", "unavailable", "no CUDA")),
        (None, None, 1, None, False, False, ("stand-in", "failed", "exit code 1")),
        (None, None, -9, None, True, False, ("stand-in", "interrupted", "killed by SIGKILL")),
        (None, {"status": "ok"}, 0, None, False, False, ("keep", None, None)),
        (None, {"status": "diverged"}, 1, "x", False, False, ("keep", None, None)),
        (None, RUNNING, -9, None, False, False, ("update", "failed", "killed by SIGKILL")),
        (
            None,
            RUNNING,
            -9,
            "oom",
            True,
            False,
            ("update", "interrupted", "oom; killed by SIGKILL"),
        ),
        (
            BEFORE,
            BEFORE,
            2,
            "checkpoint-1.pt does not match",
            False,
            True,
            ("start over", None, "checkpoint-1.pt does not match"),
        ),
        (
            BEFORE,
            BEFORE,
            -9,
            None,
            False,
            True,
            (
                "update",
                "failed",
                "killed by SIGKILL, before it wrote anything; what an earlier "
                "attempt measured is kept",
            ),
        ),
        (
            BEFORE,
            BEFORE,
            2,
            "/r: another process is writing that run",
            False,
            True,
            ("leave", None, "/r: another process is writing that run"),
        ),
        (
            BEFORE,
            {**RUNNING, "epochs": [1, 2]},
            130,
            None,
            True,
            True,
            ("update", "interrupted", "exit code 130"),
        ),
    ],
)
def test_what_an_arms_attempt_ended_as(
    before, after, code, last, interrupted, resuming, expected
):
    got = compare.outcome(
        as_record(before), as_record(after), code, last, interrupted, resuming
    )
    assert (got.action, got.status, got.error) == expected


def test_every_arm_takes_every_place_in_the_order_equally_often():
    impls, precisions = ["plain", "lightning", "fabric"], ["32-true", "bf16-mixed"]
    n = 3 * 2 + 2  # and the control at each precision
    arms = plan.schedule(impls, precisions, n, control=True, key="k")
    assert len(arms) == n * n
    places = {}
    for a in arms:
        assert a.position == arms.index(a) % n and a.repeat == arms.index(a) // n
        places.setdefault((a.impl, a.precision, a.control), []).append(a.position)
    assert len(places) == n
    assert all(sorted(p) == list(range(n)) for p in places.values())
    # an even count: every arm comes right after every other exactly once
    pairs = [
        (arms[i].run_id.split("-r")[0], arms[i + 1].run_id.split("-r")[0])
        for i in range(len(arms) - 1)
        if arms[i].repeat == arms[i + 1].repeat
    ]
    assert len(set(pairs)) == len(pairs) == n * (n - 1)


def test_the_order_is_seeded_and_read_back_the_same():
    one = plan.schedule(
        ["plain", "fabric"], ["32-true", "bf16-mixed"], 3, control=True, key="a"
    )
    again = plan.schedule(
        ["plain", "fabric"], ["32-true", "bf16-mixed"], 3, control=True, key="a"
    )
    other = plan.schedule(
        ["plain", "fabric"], ["32-true", "bf16-mixed"], 3, control=True, key="b"
    )
    assert [a.run_id for a in one] == [a.run_id for a in again]
    assert [a.run_id for a in one] != [a.run_id for a in other]
    # an odd count over its whole square: every place, once each
    odd = plan.schedule(["plain", "fabric", "lightning"], ["32-true"], 3, key="c")
    for name in ("plain", "fabric", "lightning"):
        assert sorted(a.position for a in odd if a.impl == name) == [0, 1, 2]


def test_child_args_reproduce_the_config():
    cfg = Config(
        dataset="synthetic",
        model="small",
        batch_size=64,
        lr=3e-4,
        clip_grad=0.5,
        download=False,
        tf32=True,
        limit_train_batches=5,
        seed=7,
        checkpoint=False,
    )
    seen = {}

    @cli.command("_echo", hidden=True)
    @common_options
    def _echo(**options):
        seen.update(config_from(options).to_dict())
        return 0

    try:
        r = CliRunner().invoke(cli, ["_echo", *compare.child_args(cfg)])
        assert r.exit_code == 0, r.output
    finally:
        cli.commands.pop("_echo")
    expected = cfg.to_dict()
    from common.config import names

    for name in names(per_arm=True):
        expected.pop(name), seen.pop(name)
    assert seen == expected


def test_interrupting_compare_keeps_the_running_arm_and_reports(tmp_path):
    out = tmp_path / "runs"
    proc, result = start_plain_compare(out, 50)
    proc.send_signal(signal.SIGINT)  # to the parent only, as `kill -INT` would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    record = json.loads(result.read_text())
    assert record["status"] == "interrupted" and record["epochs"]
    assert (result.parent.parent / "report.md").exists()


def test_an_arm_killed_outright_is_failed_not_running(tmp_path, monkeypatch):
    faults.inject_children(monkeypatch, epoch=1, action="exit")
    cfg = config_from(
        {
            "dataset": "synthetic",
            "model": "small",
            "synthetic_size": 128,
            "batch_size": 64,
            "epochs": 3,
            "accelerator": "cpu",
            "checkpoint": False,
        }
    )
    folder = str(tmp_path / "cmp")
    record, stop = compare.run_arm(cfg, plan.Arm("plain", "32-true", 0), folder, {}, {})
    assert record.status == "failed" and record.error == "exit code 137" and not stop
    assert len(record.epochs) == 1  # what it measured before it died is kept
    assert analysis.load([folder])[0].status == "failed"
