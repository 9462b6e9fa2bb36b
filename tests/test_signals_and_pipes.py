"""A closed terminal (SIGHUP), a reader that goes away (SIGPIPE), signals that come late, a
bench stopped half-way, and an environment left over from another job: the run goes on or
stops as docs/failures.md says, its files are whole, and its exit code is the record's."""

import json
import os
import signal
import shlex
import subprocess
import sys
import time

import pytest

from tests import faults
from tests.conftest import (
    AMPCOMPARE,
    ARMS_ONLY,
    ROOT,
    TINY_ARGS,
    run_cli,
    start_plain_compare,
    start_until_first_epoch,
)

COMPARE_ARGS = [*TINY_ARGS[:-3], "--quiet"]  # tiny(), less --precision: compare has its own


def record_of(path):
    return json.loads(path.read_text())


def no_leftovers(run_dir):
    return not [
        p.name
        for p in run_dir.iterdir()
        if p.name.startswith(".tmp-") or p.name in (".reserve", ".ranks")
    ]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_closed_terminal_ends_a_run_as_sigterm_does(tmp_path, sig):
    out = tmp_path / "runs"
    proc, path = start_until_first_epoch(
        ["plain", *TINY_ARGS, "--epochs", "500", "--out-dir", str(out)], out, "*/result.json"
    )
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    record = record_of(path)
    assert record["status"] == "interrupted" and no_leftovers(path.parent)


def test_a_closed_terminal_stops_compare_with_its_report(tmp_path):
    out = tmp_path / "runs"
    proc, path = start_plain_compare(out, 500, COMPARE_ARGS)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert record_of(path)["status"] == "interrupted"
    assert (path.parent.parent / "report.md").exists()


def piped(args, cwd=ROOT):
    """`ampcompare ARGS 2>&1 | head -1`: the reader takes one line and goes away."""
    cmd = shlex.join([*AMPCOMPARE, *args]) + ' 2>&1 | head -1; echo "rc=${PIPESTATUS[0]}"'
    proc = subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    first, rc = proc.stdout.splitlines()[0], proc.stdout.splitlines()[-1]
    return first, int(rc.removeprefix("rc="))


def test_output_that_goes_away_does_not_stop_a_comparison(tmp_path):
    out = tmp_path / "runs"
    first, rc = piped(
        [
            "compare",
            *COMPARE_ARGS,
            "--epochs",
            "1",
            "--impls",
            "plain,lightning",
            "--precisions",
            "32",
            *ARMS_ONLY,
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0 and first.startswith("[1/2]")
    (folder,) = out.iterdir()
    for arm in ("plain-32-true-r0", "lightning-32-true-r0"):
        assert record_of(folder / arm / "result.json")["status"] == "ok"
    for name in ("report.md", "results.csv", "summary.json", "benchmark.png"):
        assert (folder / name).stat().st_size > 0
    first, rc = piped(["report", str(folder)])
    assert rc == 0 and first == "# ampcompare report"
    first, rc = piped(["plain", *TINY_ARGS, "--epochs", "1", "--out-dir", str(out)])
    assert rc == 0 and first.startswith("plain 32-true: ok")


def test_a_signal_after_the_run_printed_its_end_is_absorbed(tmp_path):
    for attempt in range(3):
        proc = subprocess.Popen(
            [
                *AMPCOMPARE,  # the interpreter's own teardown is under test
                "plain",
                *TINY_ARGS,
                "--epochs",
                "1",
                "--out-dir",
                str(tmp_path),
                "--run-id",
                f"r{attempt}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:
            if line.startswith("result: "):
                break
        while proc.poll() is None:  # through the interpreter's teardown, until it is gone
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        proc.communicate(timeout=60)
        assert proc.returncode == 0, proc.returncode
        assert record_of(tmp_path / f"r{attempt}" / "result.json")["status"] == "ok"


def test_ctrl_c_to_compare_after_its_last_arm_ended_ok_is_absorbed(tmp_path, monkeypatch):
    faults.inject_children(monkeypatch, epoch=0, action="sigint-parent3", step="ended")
    out = tmp_path / "runs"
    proc = run_cli(
        [
            "compare",
            *COMPARE_ARGS,
            "--epochs",
            "1",
            "--impls",
            "plain",
            "--precisions",
            "32",
            "--no-control",  # the signal comes after the last arm: plain, the only one
            "--no-warmup",  # (the fault is in every child: the warm-up's too)
            "--out-dir",
            str(out),
            "--quiet",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "interrupted" not in proc.stderr
    (folder,) = out.iterdir()
    assert record_of(folder / "plain-32-true-r0" / "result.json")["status"] == "ok"
    assert "1/1" in (folder / "report.md").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_bench_stopped_half_way_keeps_what_it_measured(tmp_path, sig):
    proc = subprocess.Popen(
        [
            *AMPCOMPARE,  # threads stopped by a signal, then the interpreter's teardown
            "bench",
            "--rounds",
            "50",
            "--linear-rounds",
            "500",
            "--synthetic-size",
            "512",
            "--batch-size",
            "64",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("compare-*/process-1/linear-*/result.json")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("ampcompare: bench interrupted;")
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["interrupted"] is True
    records = [record_of(p) for p in tmp_path.glob("compare-*/process-*/*/result.json")]
    assert records and {r["status"] for r in records} == {"interrupted"}
    assert all(
        no_leftovers(p.parent) for p in tmp_path.glob("compare-*/process-*/*/result.json")
    )
    assert not list(tmp_path.glob("compare-*/process-2"))  # no process started after it


def test_bench_refuses_an_empty_out_dir_in_one_line():
    proc = subprocess.run(
        [*AMPCOMPARE, "bench", "--out-dir", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "ampcompare: error: --out-dir must name a folder, not ''"
    )


# --- the environment -------------------------------------------------------------------------


def run_with_env(args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    full = {**full, **env}
    return subprocess.run(
        [*AMPCOMPARE, *args],
        cwd=ROOT,
        env=full,
        text=True,
        capture_output=True,
        timeout=300,
    )


@pytest.mark.parametrize("stray", [{"RANK": "1"}, {"LOCAL_RANK": "0"}])
def test_a_launcher_variable_left_in_the_shell_is_ignored_and_said(tmp_path, stray):
    proc = run_with_env(
        ["plain", *TINY_ARGS, "--epochs", "1", "--out-dir", str(tmp_path)], **stray
    )
    assert proc.returncode == 0, proc.stderr
    assert "no launcher started this process, so it is ignored" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("plain 32-true: ok")  # it says what it did
    bad = run_with_env(["plain", "--epochs", "0"], **stray)
    assert bad.returncode == 2 and "--epochs must be >= 1" in bad.stderr  # and what is wrong


@pytest.mark.parametrize("threads,ok", [("abc", False), ("0", False), ("2,1", True)])
def test_omp_num_threads_in_openmps_syntax_or_one_line(tmp_path, threads, ok):
    proc = run_with_env(
        [
            "plain",
            *TINY_ARGS,
            "--devices",
            "2",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        OMP_NUM_THREADS=threads,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        lines = proc.stderr.strip().splitlines()  # nothing of OpenMP's own before it
        assert proc.returncode == 2 and lines == [
            f"ampcompare: error: OMP_NUM_THREADS={threads!r} is not a number of threads (a "
            f"positive integer, or OpenMP's list such as 2,1); set it to one, or unset it"
        ]


def test_a_resume_on_a_read_only_mount_names_the_folder(tmp_path):
    run = tmp_path / "runs" / "r"
    made = run_cli(
        [
            "plain",
            *TINY_ARGS,
            "--epochs",
            "2",
            "--out-dir",
            str(tmp_path / "runs"),
            "--run-id",
            "r",
        ]
    )
    assert made.returncode == 0, made.stderr
    script = (
        f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && "
        f"{sys.executable} -m ampcompare plain --resume {run} --epochs 3"
    )
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("no mount namespace here (unshare failed)")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"ampcompare: error: --resume {run}: {run} is on a "
        f"read-only filesystem; a resumed run writes its record "
        f"and checkpoint there"
    )
