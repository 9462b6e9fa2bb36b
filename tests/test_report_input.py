"""Reports from other machines are input too: values that look like Markdown or HTML, a device
name matplotlib would read as mathtext, glyphs its font lacks, runs of other software on the
same device, one run reached by two paths, and a terminal that speaks only ASCII."""

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner

from ampcompare import analysis, chart, report
from ampcompare.cli import cli
from plain_torch import train as plain
from record.results import RunResult
from tests.conftest import ARMS_ONLY, ROOT, TINY_ARGS, tiny


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return plain.train(tiny(tmp, run_id="base", epochs=2)).to_dict()


def write_runs(folder, records):
    for r in records:
        (folder / r["run_id"]).mkdir(parents=True)
        (folder / r["run_id"] / "result.json").write_text(json.dumps(r))


def variant(base, run_id, **env):
    r = copy.deepcopy(base)
    r["run_id"] = run_id
    r["env"].update(env)
    return r


HOSTILE = "Odd | GPU\n## injected <script>alert(1)</script> <img src=x onerror=alert(1)> `x`"


def test_values_from_records_stay_text_in_the_report(tmp_path, one_run):
    bad = variant(one_run, "run|x", device_name=HOSTILE, git_commit="abc|<b>def</b>\n| row |")
    bad["error"] = "line one\n| a | b |"
    bad["status"] = "failed"
    write_runs(
        tmp_path / "runs",
        [
            bad,
            variant(one_run, "fine", device_name=HOSTILE, git_commit="abc|<b>def</b>\n| row |"),
        ],
    )
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert [h.split(" ")[0] for h in headings] == ["#", "##", "###", "##"], headings
    rows = [line for line in md.splitlines() if line.startswith("|")]
    env_rows = rows[
        : rows.index(
            "| impl | runs ok | step time [95% interval] | epoch time (s) "
            "| images/s | TFLOP/s | MFU | activation memory (MiB) | model state (MiB) "
            "| peak memory (MiB, process RSS) | final test acc |"
        )
    ]
    assert len(env_rows) == len(report.ENV_KEYS) + 2  # no row was injected
    for line in rows:  # every row has its table's number of cells: no "|" got in raw
        cells = line.replace("\\|", "").count("|")
        assert cells in (3, 5, 7, 12), line
    assert "\\`x\\`" in md and "&lt;script&gt;" in md


@pytest.mark.parametrize("name", ["Odd $\\notacommand{$ GPU", "显卡 🚀 GPU"])
def test_the_chart_draws_any_device_name(tmp_path, one_run, name):
    write_runs(tmp_path / "runs", [variant(one_run, "r", device_name=name)])
    summary = analysis.summarize(analysis.load([tmp_path / "runs"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph warns; mathtext raises
        chart.write(summary, str(tmp_path / "benchmark.png"))
    assert (tmp_path / "benchmark.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "key,value",
    [
        ("torch", "2.11.0"),
        ("lightning", "2.5.0"),
        ("git_commit", "0" * 40),
        ("host", "elsewhere"),
    ],
)
def test_runs_of_other_software_on_the_same_device_are_never_one_cell(
    tmp_path, one_run, key, value
):
    write_runs(
        tmp_path / "runs", [variant(one_run, "a"), variant(one_run, "b", **{key: value})]
    )
    summary = analysis.summarize(analysis.load([tmp_path / "runs"]))
    assert len(summary.devices) == 2
    assert any(f"{key} {value}" in g.device for g in summary.devices)
    for group in summary.devices:
        assert group.precisions["32-true"]["plain"].runs == 1


def test_a_run_is_counted_once_however_many_paths_reach_it(tmp_path, one_run):
    write_runs(tmp_path / "runs" / "sub", [variant(one_run, "a")])
    folder = tmp_path / "runs"
    for paths in ([folder, folder], [folder, folder / "sub"], [tmp_path, folder]):
        records = analysis.load(paths)
        assert [r.run_id for r in records] == ["a"], paths
    r = CliRunner().invoke(
        cli, ["report", str(folder), str(folder / "sub"), "--out", str(tmp_path / "out")]
    )
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 2
    assert "| plain | 1/1 |" in (tmp_path / "out" / "report.md").read_text()


def test_an_ascii_terminal_gets_every_file_and_what_it_can_show(tmp_path):
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ampcompare",
            "compare",
            *TINY_ARGS[:-3],
            "--epochs",
            "1",
            "--impls",
            "plain",
            "--precisions",
            "32,bf16",
            *ARMS_ONLY,
            "--quiet",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert "×" in text and (folder / "benchmark.png").exists()
    assert "# ampcompare report" in proc.stdout and "×" not in proc.stdout


def test_a_copied_compare_folder_counts_each_run_once(tmp_path, one_run):
    # The same run under two names (a copy of the folder): one run, not two repeats.
    import shutil

    write_runs(tmp_path / "a", [variant(one_run, "r0"), variant(one_run, "r1", pid=1)])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    skipped = []
    records = analysis.load([str(tmp_path / "a"), str(tmp_path / "b")], skipped)
    assert sorted(r.run_id for r in records) == ["r0", "r1"]
    assert len(skipped) == 2 and all("a copy of" in why for _, why in skipped)
    (cell,) = analysis.summarize(records).devices[0].precisions["32-true"].values()
    assert cell.runs == 2


def test_runs_with_other_thread_counts_are_never_one_cell(one_run):
    records = [variant(one_run, "two", threads=2), variant(one_run, "one", threads=1, pid=2)]
    devices = analysis.summarize([RunResult.from_dict(r) for r in records]).devices
    assert len(devices) == 2 and all("threads" in d.device for d in devices)


@pytest.mark.parametrize(
    "bad", [None, float("nan"), float("inf"), 0.0, -0.01, "1", 1e300, 1e-300, 5e-324, []]
)
def test_a_record_with_an_unusable_step_time_is_skipped_and_named(tmp_path, one_run, bad):
    broken = variant(one_run, "broken", pid=3)
    if bad == []:  # no step times for an epoch that says it took steps
        broken["epochs"][1]["step_times_s"] = bad
    else:
        broken["epochs"][1]["step_times_s"][0] = bad
    write_runs(tmp_path, [variant(one_run, "fine"), broken])
    skipped = []
    records = analysis.load([str(tmp_path)], skipped)
    assert [r.run_id for r in records] == ["fine"]
    ((path, why),) = skipped
    assert "broken" in path and (
        "not a number from 1e-09 s to under 1e+06 s" in why
        or "step_times" in why
        or "step times for" in why
        or "not strict JSON" in why  # NaN, Infinity: written by no record of ours
    )
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code == 0 and "skipped" in r.stderr and "broken" in r.stderr
    md = (tmp_path / "report.md").read_text()
    assert "nan" not in md.lower().replace("nanogpt", "") and "0.00 µs" not in md


def test_report_follows_no_link_twice(tmp_path, one_run):
    # A folder with two links to itself: a glob that follows them walks 2^depth folders.
    write_runs(tmp_path, [variant(one_run, "only")])
    os.symlink(".", tmp_path / "a")
    os.symlink(".", tmp_path / "b")
    os.symlink(tmp_path / "only", tmp_path / "only-again")
    found = analysis.result_files(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in found] == [
        os.path.join("only", "result.json")
    ]
    assert [r.run_id for r in analysis.load([str(tmp_path)])] == ["only"]


def test_a_run_left_running_by_a_process_that_is_gone_is_reported_failed(tmp_path, one_run):
    gone = variant(one_run, "gone", pid=4)
    gone["status"] = "running"
    write_runs(tmp_path, [gone])
    (record,) = analysis.load([str(tmp_path)])
    assert record.status == "failed" and "ended without recording" in record.error
    # while a live process holds its folder, it is running
    from record.rundir import lock

    held = lock(str(tmp_path / "gone"), "held by this test")
    try:
        (record,) = analysis.load([str(tmp_path)])
        assert record.status == "running"
    finally:
        os.close(held)


def test_report_refuses_an_out_folder_holding_a_folder_where_a_file_goes(tmp_path, one_run):
    """Said before anything is written: three of four report files were written before."""
    write_runs(tmp_path / "runs", [variant(one_run, "fine")])
    out = tmp_path / "out"
    (out / "benchmark.png").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "runs"), "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "its benchmark.png is a folder" in r.stderr
    assert [p.name for p in out.iterdir()] == ["benchmark.png"]
