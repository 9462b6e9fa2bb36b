"""Nothing lost, nothing misreported: signals, a full disk, relative paths, divergence, broken
records. Each test here reproduces a way a run or a comparison once ended with a wrong status,
a traceback or a lost measurement."""

import errno
import json
import os
import signal
import stat
import subprocess
import time

import pytest
import torch
from click.testing import CliRunner

from ampcompare import analysis, compare, plan, report
from ampcompare.cli import cli, config_from
from common import metrics
from record import results
from lightning_impl import train as lightning
from plain_torch import train as plain
from tests import faults
from tests.conftest import (
    AMPCOMPARE,
    ARMS_ONLY,
    SMALL_RUN,
    checkpoint_of,
    run_cli,
    start_plain_compare,
    tiny,
)

TINY_CMP = [
    *SMALL_RUN,
    *"--batch-size 32 --limit-train-batches 2 --limit-test-batches 1 --quiet".split(),
]
TINY_CLI = [*TINY_CMP, "--precision", "32"]


def saved(run_dir):
    with open(run_dir / "result.json") as f:
        return json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))


def assert_checkpoint_intact(run_dir, epochs):
    record = saved(run_dir)
    path = checkpoint_of(run_dir)
    assert record["checkpoint"]["epochs"] == epochs
    assert results_sha256(path) == record["checkpoint"]["sha256"]
    assert len(torch.load(path, weights_only=True)["ampcompare"]["epochs"]) == epochs
    assert not [
        p.name
        for p in run_dir.iterdir()  # no temporary file, no reserve
        if p.name.startswith(".tmp-") or p.name == ".reserve"
    ]


def results_sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arm,action",
    [
        ("plain", "sigterm"),
        ("plain", "sigint2"),
        ("lightning", "sigterm"),
        ("lightning", "sigint2"),
    ],
)
def test_a_signal_while_the_checkpoint_is_written_leaves_the_last_good_one(
    tmp_path, monkeypatch, arm, action
):
    faults.inject_children(monkeypatch, epoch=1, action=action, step="save")
    out = tmp_path / "runs"
    proc = run_cli([arm, *TINY_CLI, "--epochs", "3", "--out-dir", str(out), "--run-id", "r"])
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    record = saved(out / "r")
    # epoch 1 was measured but never saved: kept aside, in no figure; a resume redoes it
    assert record["status"] == "interrupted" and len(record["epochs"]) == 1
    assert record["unsaved_epoch"]["epoch"] == 1
    assert record["weights_epochs"] == 1  # the hash is of the weights in the checkpoint
    assert_checkpoint_intact(out / "r", epochs=1)


@pytest.mark.parametrize("arm", ["plain", "lightning"])
def test_signals_after_the_last_epoch_is_recorded_change_nothing(tmp_path, monkeypatch, arm):
    faults.inject_children(monkeypatch, epoch=1, action="sigint2", step="recorded")
    proc = run_cli(
        [arm, *TINY_CLI, "--epochs", "2", "--out-dir", str(tmp_path), "--run-id", "r"]
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert saved(tmp_path / "r")["status"] == "ok"


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc = subprocess.Popen(
        [*AMPCOMPARE, "plain", *TINY_CLI, "--out-dir", str(tmp_path)],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.3)  # importing torch takes longer than this
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "ampcompare: interrupted\n", stderr


def test_a_second_signal_to_compare_ends_the_arm_and_leaves_no_process(tmp_path):
    out = tmp_path / "runs"
    proc, path = start_plain_compare(out, 100)
    child = json.loads(path.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert json.loads(path.read_text())["status"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert "running" not in (path.parent.parent / "report.md").read_text()


def test_a_hung_arm_and_ctrl_c_is_interrupted_not_running(tmp_path, monkeypatch):
    faults.inject_children(monkeypatch, epoch=1, action="stop")  # SIGSTOP itself in epoch 1
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            *AMPCOMPARE,
            "compare",
            *SMALL_RUN,
            "--epochs",
            "3",
            "--impls",
            "plain",
            "--precisions",
            "32",
            *ARMS_ONLY,
            "--out-dir",
            str(out),
        ],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    path = None
    for _ in range(300):
        found = list(out.glob("*/plain-32-true-r0/result.json"))
        if found and json.loads(found[0].read_text())["epochs"]:
            path = found[0]
            break
        time.sleep(0.2)
    assert path is not None
    time.sleep(1)  # into epoch 1, where it stops itself
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert json.loads(path.read_text())["status"] == "interrupted"


# --- a full disk -----------------------------------------------------------------------------


def test_a_full_disk_fails_the_run_keeps_what_was_measured_and_it_resumes(
    tmp_path, monkeypatch
):
    straight = plain.train(tiny(tmp_path, run_id="straight", epochs=3))
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="enospc", step="save")
        full = plain.train(tiny(tmp_path, run_id="full", epochs=3))
    run_dir = tmp_path / "runs" / "full"
    assert full.status == "failed" and full.exit_code == 1
    assert full.error.startswith("disk full (No space left on device) while writing")
    assert full.error.endswith("; the last complete checkpoint and record are kept")
    record = saved(run_dir)
    assert record["status"] == "failed" and len(record["epochs"]) == 1
    assert record["unsaved_epoch"]["epoch"] == 1  # epoch 1 was measured, and is kept aside
    assert_checkpoint_intact(run_dir, epochs=1)
    assert "No space left on device" in (run_dir / "error.log").read_text()
    again = plain.train(tiny(tmp_path, run_id="full", epochs=3, resume=str(run_dir)))
    assert again.status == "ok" and again.step_losses == straight.step_losses
    assert again.weights_sha256 == straight.weights_sha256


def test_a_full_disk_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        faults.inject(m, epoch=0, action="enospc", step="save")
        full = plain.train(tiny(tmp_path, run_id="full", epochs=2))
    assert full.status == "failed" and full.checkpoint is None and full.epochs == []
    assert full.error.endswith("; no checkpoint had been written yet; the record is kept")


def test_a_really_full_tmpfs(tmp_path):
    """The same on a real 3 MiB tmpfs, where the second checkpoint does not fit."""
    script = (
        f"mount -t tmpfs -o size=3m tmpfs {tmp_path} && cd {os.getcwd()} && "
        f"{os.sys.executable} -m ampcompare plain {' '.join(TINY_CLI)} --epochs 3 "
        f"--out-dir {tmp_path} --run-id r; echo rc=$?; cat {tmp_path}/r/result.json"
    )
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(
            "no mount namespace here (unshare failed); the injected ENOSPC test covers it"
        )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out, _, record = proc.stdout.partition("rc=1\n")
    assert record, (proc.stdout, proc.stderr)
    record = json.loads(record)
    assert record["status"] == "failed" and "disk full" in record["error"]
    assert record["checkpoint"]["epochs"] == len(record["epochs"]) >= 1
    assert record["unsaved_epoch"]["epoch"] == len(record["epochs"])
    assert "Traceback" not in proc.stderr


def test_a_full_disk_when_compare_writes_its_report_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "write", full)
    r = CliRunner().invoke(
        cli,
        [
            "compare",
            *TINY_CMP,
            "--epochs",
            "1",
            "--impls",
            "apex",
            *ARMS_ONLY,
            "--out-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 1 and r.stderr.strip().endswith("No space left on device"), r.stderr


@pytest.mark.parametrize("where", ["folder", "plan"])
def test_a_full_disk_when_compare_starts_is_one_line(tmp_path, monkeypatch, where):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "folder":
        monkeypatch.setattr(plan.os, "makedirs", full)
    else:
        monkeypatch.setattr(plan.files, "write_json", full)
    r = CliRunner().invoke(
        cli,
        ["compare", *TINY_CMP, "--epochs", "1", "--impls", "plain", "--out-dir", str(tmp_path)],
    )
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot start a comparison in" in lines[0], r.stderr
    assert lines[0].endswith("No space left on device") and not list(tmp_path.iterdir())


# --- paths -----------------------------------------------------------------------------------


def test_compare_with_relative_paths_from_another_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli(
        [
            "compare",
            *TINY_CMP,
            "--epochs",
            "1",
            "--impls",
            "plain",
            "--precisions",
            "32",
            *ARMS_ONLY,
            "--out-dir",
            "rel",
            "--data-dir",
            "data",
        ],
        cwd=elsewhere,
    )
    assert proc.returncode == 0, proc.stderr
    (folder,) = (elsewhere / "rel").iterdir()
    assert saved(folder / "plain-32-true-r0")["status"] == "ok"
    plan = json.loads((folder / "compare.json").read_text())
    assert plan["config"]["data_dir"] == str(elsewhere / "data")


def test_child_args_carry_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from({"out_dir": "o", "data_dir": "d"}).validate()
    args = compare.child_args(cfg)
    assert args[args.index("--data-dir") + 1] == str(tmp_path / "d")


def test_two_compares_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "timestamp", lambda: "20260101-000000")
    folders = {plan.new_folder(str(tmp_path)) for _ in range(3)}
    assert len(folders) == 3 and all(os.path.isdir(f) for f in folders)


# --- statuses that are true ------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_huge_learning_rate_diverges(tmp_path, precision):
    result = plain.train(tiny(tmp_path, lr=1e6, epochs=3, precision=precision))
    assert result.status == "diverged" and result.exit_code == 1
    assert result.error.startswith("mean training loss")
    assert "above 23.0 (10 x ln 10" in result.error
    assert len(result.epochs) == 1  # stopped after the first epoch that showed it


def test_a_collapsed_fp16_loss_scale_is_divergence(tmp_path, monkeypatch):
    real = torch.amp.GradScaler.__init__

    def tiny_scale(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "init_scale": 0.25})

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", tiny_scale)
    result = lightning.train(tiny(tmp_path, precision="16-mixed", epochs=2))
    assert result.status == "diverged" and "loss scale fell to 0.25" in result.error


def test_nan_losses_are_null_in_strict_json_and_say_why(tmp_path):
    result = plain.train(tiny(tmp_path, run_id="nan", lr=1e30, optimizer="sgd", epochs=3))
    assert result.status == "diverged"
    record = saved(tmp_path / "runs" / "nan")  # fails on NaN or Infinity
    nulls = [i for i, v in enumerate(record["step_losses"]) if v is None]
    assert nulls and all(
        any(f"step_losses[{i}]" in n for n in record["nonfinite"]) for i in nulls
    )


def test_out_of_memory_on_cpu_is_oom_with_the_figures(tmp_path, monkeypatch):
    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(metrics.EpochMeter, "train_done", no_memory)
    result = plain.train(tiny(tmp_path, epochs=1))
    assert result.status == "oom" and "batch size 32" in result.error
    assert "process peak RSS" in result.error and "MiB RAM" in result.error


def test_files_are_readable_as_the_umask_allows(tmp_path):
    plain.train(tiny(tmp_path, run_id="p", epochs=1))
    mask = os.umask(0)
    os.umask(mask)
    for path in (
        tmp_path / "runs" / "p" / "result.json",
        checkpoint_of(tmp_path / "runs" / "p"),
    ):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o666 & ~mask, (path, oct(mode))


def test_a_killed_child_is_described_by_its_signal():
    from ampcompare.launch import exit_description

    assert exit_description(-9) == "killed by SIGKILL" and exit_description(3) == "exit code 3"


# --- report ----------------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path):
    out = tmp_path / "runs"
    plain.train(tiny(tmp_path, run_id="adam", epochs=1))
    plain.train(tiny(tmp_path, run_id="sgd", epochs=1, optimizer="sgd", lr=0.01))
    return out


ALMOST = (
    '{"run_id": "x", "impl": "plain", "status": "ok", "config": {}, "env": {}, '
    '"precision": %s, "epochs": %s, "summary": %s}'
)
GOOD = ('{"requested": "32-true", "effective": "32-true"}', "[]", "{}")


def almost(precision=GOOD[0], epochs=GOOD[1], summary=GOOD[2]):
    return ALMOST % (precision, epochs, summary)


@pytest.mark.parametrize(
    "content",
    [
        "garbage{",
        '{"run_id": "x"',
        "{}",
        "[]",
        "",
        almost(summary="null"),
        almost(summary='{"median_epoch_time_s": "x"}'),
        almost(precision="{}"),
        almost(epochs="[1, 2]"),
    ],
    ids=[
        "garbage",
        "truncated",
        "empty object",
        "a list",
        "empty file",
        "null summary",
        "a word for a number",
        "no precision names",
        "epochs not objects",
    ],
)
def test_report_skips_a_broken_record_and_names_it(two_runs, tmp_path, content):
    bad = two_runs / "broken"
    bad.mkdir()
    (bad / "result.json").write_text(content)
    r = CliRunner().invoke(cli, ["report", str(two_runs), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert f"skipped {bad / 'result.json'}" in r.stderr
    assert (tmp_path / "rep" / "report.md").exists()


def test_report_never_averages_runs_with_different_settings(two_runs):
    summary = analysis.summarize(analysis.load([two_runs]))
    assert len(summary.devices) == 2
    names = [d.device for d in summary.devices]
    assert any("optimizer adam" in n and "lr 0.0001" in n for n in names)
    assert any("optimizer sgd" in n and "lr 0.01" in n for n in names)
    for group in summary.devices:
        assert group.precisions["32-true"]["plain"].runs == 1


@pytest.mark.parametrize("where", ["a file", "under /proc"])
def test_report_into_a_place_it_cannot_write_is_one_line(two_runs, tmp_path, where):
    out = tmp_path / "a-file" if where == "a file" else "/proc/ampcompare-report"
    if where == "a file":
        out.write_text("x")
    r = CliRunner().invoke(cli, ["report", str(two_runs), "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("ampcompare: error: --out")
