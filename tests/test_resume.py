"""Stop and resume: a run stopped after an epoch, or in the middle of one, and resumed gives the
same per-step losses and final weights as a straight run (docs/equivalence.md). The
checkpoint is written atomically each epoch and read back with weights_only=True; a truncated
or changed one, or an option that differs, is refused before anything is overwritten."""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from click.testing import CliRunner

from accelerate_impl import train as accelerate
from fabric_impl import train as fabric
from lightning_impl import train as lightning
from plain_torch import train as plain
from tests import faults
from tests.conftest import AMPCOMPARE, ROOT, checkpoint_of, run_cli, tiny

ARMS = {"plain": plain, "lightning": lightning, "fabric": fabric, "accelerate": accelerate}
# Every arm at every precision it runs on a CPU (Accelerate refuses 16-mixed there).
ROUND_TRIPS = [
    (arm, precision)
    for arm in ARMS
    for precision in ("32-true", "bf16-mixed", "16-mixed")
    if (arm, precision) != ("accelerate", "16-mixed")
]


def resumed_run(tmp_path, monkeypatch, arm, stop_step, **overrides):
    """A 2-epoch run interrupted in epoch 1 (after `stop_step` of its steps, or at once when
    its training ends with stop_step=None), then resumed through the CLI's own path."""
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt", step=stop_step)
        stopped = ARMS[arm].train(tiny(tmp_path, run_id="stopped", **overrides))
    assert stopped.status == "interrupted" and len(stopped.epochs) == 1
    assert stopped.checkpoint["epochs"] == 1
    run_dir = tmp_path / "runs" / "stopped"
    return ARMS[arm].train(tiny(tmp_path, run_id="stopped", resume=str(run_dir), **overrides))


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("arm,precision", ROUND_TRIPS)
def test_stopped_mid_epoch_and_resumed_is_bitwise_a_straight_run(
    tmp_path, monkeypatch, arm, precision
):
    straight = ARMS[arm].train(tiny(tmp_path, run_id="straight", precision=precision))
    resumed = resumed_run(tmp_path, monkeypatch, arm, stop_step=2, precision=precision)
    assert straight.status == resumed.status == "ok"
    assert resumed.step_losses == straight.step_losses and len(straight.step_losses) == 6
    assert resumed.weights_sha256 == straight.weights_sha256
    assert [r["loss_scale"] for r in resumed.epochs] == [
        r["loss_scale"] for r in straight.epochs
    ]
    assert [r["warmup"] for r in resumed.epochs] == [True, True]  # a new process warms up
    assert straight.resumes == [] and [r["epoch"] for r in resumed.resumes] == [1]
    assert resumed.resumes[0]["env"]["torch"] == torch.__version__
    if arm != "lightning":  # (the Trainer's checkpoint is Lightning's own format)
        ckpt = torch.load(checkpoint_of(tmp_path / "runs" / "stopped"), weights_only=True)
        assert {"model", "optimizer", "scheduler", "ampcompare"} <= set(ckpt)
        if arm == "fabric":  # fabric.save leaves the scaler out unless there is one
            assert ("scaler" in ckpt) == (precision == "16-mixed")


@pytest.mark.parametrize("arm", ["plain", "lightning"])
def test_an_ok_run_trains_further_with_more_epochs(tmp_path, arm):
    straight = ARMS[arm].train(tiny(tmp_path, run_id="straight", epochs=3))
    first = ARMS[arm].train(tiny(tmp_path, run_id="grown", epochs=2))
    assert first.status == "ok"
    grown = ARMS[arm].train(
        tiny(tmp_path, run_id="grown", epochs=3, resume=str(tmp_path / "runs" / "grown"))
    )
    assert grown.status == "ok" and grown.step_losses == straight.step_losses
    assert grown.weights_sha256 == straight.weights_sha256


def test_the_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    result = plain.train(tiny(tmp_path, run_id="r", precision="16-mixed", epochs=1))
    path = checkpoint_of(tmp_path / "runs" / "r")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scheduler", "scaler", "ampcompare"}
    assert ckpt["scaler"]["scale"] == 65536.0
    assert ckpt["ampcompare"]["epochs"] == result.epochs
    assert result.checkpoint["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    saved = json.loads((tmp_path / "runs" / "r" / "result.json").read_text())
    assert saved["checkpoint"] == result.checkpoint
    lit = lightning.train(tiny(tmp_path, run_id="l", epochs=1))
    ckpt = torch.load(checkpoint_of(tmp_path / "runs" / "l"), weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "ampcompare"} <= set(
        ckpt
    )
    assert lit.checkpoint["epochs"] == 1


def cli(*args):
    from ampcompare.cli import cli as group

    return CliRunner().invoke(group, list(args))


def one_line_exit_2(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ampcompare: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A plain run interrupted in its second epoch, with one epoch's checkpoint."""
    faults.inject(monkeypatch, epoch=1, action="interrupt")
    plain.train(tiny(tmp_path, run_id="s", epochs=3))
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "s"
    return run_dir, {p.name: p.read_bytes() for p in run_dir.iterdir()}


def assert_unchanged(run_dir, before):
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "swap for another run's"])
def test_a_damaged_checkpoint_is_refused_and_nothing_is_overwritten(stopped, tmp_path, damage):
    run_dir, before = stopped
    ckpt = checkpoint_of(run_dir)
    blob = before[ckpt.name]
    if damage == "truncate":
        ckpt.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip a byte":
        ckpt.write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    else:
        plain.train(tiny(tmp_path, run_id="other", epochs=1, seed=5))
        ckpt.write_bytes(checkpoint_of(tmp_path / "runs" / "other").read_bytes())
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    one_line_exit_2(cli("plain", "--resume", str(run_dir)), f"{ckpt.name} does not match")
    assert_unchanged(run_dir, before)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--lr", "0.5"], "--lr 0.5 differs from the stopped run's --lr 0.0001"),
        (["--no-channels-last"], "--no-channels-last differs from the stopped run's default"),
        (["--precision", "bf16"], "--precision bf16-mixed differs"),
        # named before the rung's own check: bf16-fsdp wants --strategy fsdp
        (["--precision", "bf16-fsdp"], "--precision bf16-fsdp differs"),
        (["--out-dir", "elsewhere"], "drop --out-dir"),
        (["--epochs", "2"], "was started with --epochs 3; --epochs may only be raised"),
    ],
    ids=["lr", "a flag", "precision", "a sharded rung", "out-dir", "fewer epochs"],
)
def test_a_resume_that_would_change_the_run_is_refused(stopped, args, fragment):
    run_dir, before = stopped
    one_line_exit_2(cli("plain", "--resume", str(run_dir), *args), fragment)
    assert_unchanged(run_dir, before)


def test_resume_needs_the_same_command_and_a_checkpoint(stopped, tmp_path):
    run_dir, before = stopped
    one_line_exit_2(cli("lightning", "--resume", str(run_dir)), "is a plain run")
    plain.train(tiny(tmp_path, run_id="nock", checkpoint=False, epochs=1))
    one_line_exit_2(
        cli("plain", "--resume", str(tmp_path / "runs" / "nock"), "--epochs", "2"),
        "has no checkpoint",
    )
    one_line_exit_2(cli("plain", "--resume", str(tmp_path / "nowhere")), "no such folder")
    assert_unchanged(run_dir, before)


def test_a_run_stopped_after_its_last_epoch_is_finished_by_resume(tmp_path):
    done = plain.train(tiny(tmp_path, run_id="late"))
    run_dir = tmp_path / "runs" / "late"
    path = run_dir / "result.json"
    record = json.loads(path.read_text())
    # What a signal after the last checkpoint, during the final write, used to leave.
    record["status"] = "interrupted"
    path.write_text(json.dumps(record))
    finished = plain.train(tiny(tmp_path, run_id="late", resume=str(run_dir)))
    assert finished.status == "ok" and finished.step_losses == done.step_losses
    assert json.loads(path.read_text())["status"] == "ok"
    one_line_exit_2(cli("plain", "--resume", str(run_dir)), "has 2 epochs done")


def test_resume_through_the_cli_finishes_the_run(stopped):
    run_dir, _ = stopped
    r = cli("plain", "--resume", str(run_dir))
    assert r.exit_code == 0, r.output
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["status"] == "ok" and len(saved["epochs"]) == 3
    assert [e["warmup"] for e in saved["epochs"]] == [True, True, False]


def test_compare_resume_keeps_finished_arms_and_continues_the_rest(tmp_path):
    from ampcompare.plan import Plan
    from common.config import Config
    from tests.conftest import SMALL_RUN, run_cli, start_until_first_epoch
    import signal

    out = tmp_path / "runs"
    args = [
        "compare",
        *SMALL_RUN,
        "--epochs",
        "4",
        "--impls",
        "plain",
        "--precisions",
        "32,bf16",
        "--no-control",
        "--no-warmup",
        "--out-dir",
        str(out),
    ]
    # the order the plan runs them in (seeded from its options): the second is stopped
    ran_first, ran_second = (
        a.run_id
        for a in Plan(Config(), ("plain",), ("32-true", "bf16-mixed"), 1, 1, None, False).arms()
    )
    proc, second = start_until_first_epoch(args, out, f"*/{ran_second}/result.json")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "compare --resume" in stderr, stderr
    folder = second.parent.parent
    first = json.loads((folder / ran_first / "result.json").read_text())
    stopped = json.loads(second.read_text())
    assert first["status"] == "ok" and not list((folder / ran_first).glob("checkpoint*.pt"))
    assert stopped["status"] == "interrupted" and stopped["checkpoint"]
    one_line_exit_2(
        cli("compare", "--resume", str(folder), "--lr", "0.1"),
        "--lr 0.1 differs from the comparison's --lr 0.0001",
    )
    proc = run_cli(["compare", "--resume", str(folder), "--no-warmup"])
    assert proc.returncode == 0, proc.stderr
    kept = json.loads((folder / ran_first / "result.json").read_text())
    assert kept == first  # untouched
    done = json.loads(second.read_text())
    assert done["status"] == "ok" and len(done["epochs"]) == 4
    assert done["epochs"][0] == stopped["epochs"][0]  # measured epochs are kept, not rerun
    assert sum(e["warmup"] for e in done["epochs"]) == 2
    assert "plain" in (folder / "report.md").read_text()


def test_compare_resume_starts_over_an_arm_whose_resume_is_refused_and_keeps_the_old(
    tmp_path, monkeypatch
):
    # An arm left stopped by an earlier attempt, whose checkpoint no longer matches: compare
    # --resume says why it cannot continue it, moves it aside whole (nothing is deleted) and
    # runs it from the start.
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt")
        plain.train(tiny(tmp_path, run_id="plain-32-true-r0", epochs=3, keep_checkpoint=False))
    folder = tmp_path / "runs"
    arm = folder / "plain-32-true-r0"
    cfg = json.loads((arm / "result.json").read_text())["config"]
    (folder / "compare.json").write_text(
        json.dumps(
            {
                "config": {**cfg, "out_dir": str(folder)},
                "impls": ["plain"],
                "precisions": ["32-true"],
                "repeats": 1,
                "seeds": 1,
            }
        )
    )
    ckpt = checkpoint_of(arm)
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    (arm / "NOTES.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in arm.iterdir() if p.name != ".lock"}
    # never while another compare works in that folder
    from record.rundir import lock

    held = lock(str(folder), "held by this test")
    try:
        one_line_exit_2(cli("compare", "--resume", str(folder)), "another compare is running")
    finally:
        os.close(held)
    r = cli("compare", "--resume", str(folder), "--no-warmup")
    assert r.exit_code == 0, r.output
    assert "its resume was refused" in r.stderr and "does not match the SHA-256" in r.stderr
    aside = folder / ".superseded" / "plain-32-true-r0-1"
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.name != ".lock"} == before
    again = json.loads((arm / "result.json").read_text())
    assert again["status"] == "ok" and len(again["epochs"]) == 3 and again["resumes"] == []
    assert "1/1" in (folder / "report.md").read_text()  # the aside copy is not reported


def stopped_comparison(tmp_path, monkeypatch, epochs=3):
    """A compare folder whose one arm stopped after its first epoch (a checkpoint to go on)."""
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt")
        plain.train(
            tiny(tmp_path, run_id="plain-32-true-r0", epochs=epochs, keep_checkpoint=False)
        )
    folder = tmp_path / "runs"
    cfg = json.loads((folder / "plain-32-true-r0" / "result.json").read_text())["config"]
    (folder / "compare.json").write_text(
        json.dumps(
            {
                "config": {**cfg, "out_dir": str(folder)},
                "impls": ["plain"],
                "precisions": ["32-true"],
                "repeats": 1,
                "seeds": 1,
            }
        )
    )
    return folder, folder / "plain-32-true-r0"


def test_compare_resume_never_touches_a_run_another_process_writes(tmp_path, monkeypatch):
    folder, arm = stopped_comparison(tmp_path, monkeypatch, epochs=2000)
    hand = subprocess.Popen(
        [*AMPCOMPARE, "plain", "--resume", str(arm)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while json.loads((arm / "result.json").read_text())["status"] != "running":
            assert time.monotonic() < deadline and hand.poll() is None, hand.communicate()
            time.sleep(0.1)
        for _ in range(2):  # twice: the second once deleted the live run's folder
            r = run_cli(["compare", "--resume", str(folder), "--no-warmup"])
            assert r.returncode == 1, r.stderr
            assert "skipped" in r.stderr and "another process is writing that run" in r.stderr
            assert json.loads((arm / "result.json").read_text())["status"] == "running"
    finally:
        hand.send_signal(signal.SIGINT)
        hand.communicate(timeout=120)
    assert hand.returncode == 130
    record = json.loads((arm / "result.json").read_text())
    assert record["status"] == "interrupted" and len(record["epochs"]) >= 1
    assert not (folder / ".superseded").exists()


@pytest.mark.parametrize("damage", ["paused", "truncated"])
def test_compare_resume_leaves_a_folder_with_a_bad_record_as_it_is(
    tmp_path, monkeypatch, damage
):
    folder, arm = stopped_comparison(tmp_path, monkeypatch)
    path = arm / "result.json"
    if damage == "paused":
        path.write_text(path.read_text().replace('"interrupted"', '"paused"'))
    else:
        path.write_text(path.read_text()[:200])
    (arm / "NOTES.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in arm.iterdir()}
    r = cli("compare", "--resume", str(folder), "--no-warmup")
    assert r.exit_code == 1, r.output  # the comparison is not done: a planned run has no record
    assert f"skipped {arm}" in r.stderr and "left as it is" in r.stderr
    assert "| plain-32-true-r0 | no record |" in (folder / "report.md").read_text()
    assert {p.name: p.read_bytes() for p in arm.iterdir()} == before


def test_an_arm_killed_before_it_wrote_says_so_and_resumes_later(tmp_path, monkeypatch):
    folder, arm = stopped_comparison(tmp_path, monkeypatch)
    with monkeypatch.context() as m:
        faults.inject_children(m, epoch=0, action="kill", step="start")
        r = cli("compare", "--resume", str(folder), "--no-warmup")
    assert r.exit_code == 1, r.output
    record = json.loads((arm / "result.json").read_text())
    assert record["status"] == "failed", record["status"]  # not the stale "interrupted"
    assert record["error"].startswith("killed by SIGKILL, before it wrote anything")
    assert record["checkpoint"] and len(record["epochs"]) == 1  # still resumable
    r = cli("compare", "--resume", str(folder), "--no-warmup")
    assert r.exit_code == 0, r.output
    done = json.loads((arm / "result.json").read_text())
    assert done["status"] == "ok" and [x["epoch"] for x in done["resumes"]] == [1]


def test_a_run_compare_cannot_move_aside_is_left_and_fails_the_comparison(
    tmp_path, monkeypatch
):
    """A run to start over whose .superseded/ is a file: said, left as it was, reported."""
    folder, arm = stopped_comparison(tmp_path, monkeypatch)
    record = json.loads((arm / "result.json").read_text())
    record["checkpoint"] = None  # stopped before its first checkpoint: started over
    (arm / "result.json").write_text(json.dumps(record))
    (folder / ".superseded").write_text("not a folder")
    r = cli("compare", "--resume", str(folder), "--no-warmup")
    assert r.exit_code == 1 and not isinstance(r.exception, OSError), r.output
    assert ".superseded is not a folder); it is left" in r.stderr
    assert json.loads((arm / "result.json").read_text()) == record
    assert "| plain-32-true-r0 | interrupted |" in (folder / "report.md").read_text()


def test_a_planned_run_without_a_readable_record_fails_the_comparison_and_is_a_row(
    tmp_path, monkeypatch
):
    folder, arm = stopped_comparison(tmp_path, monkeypatch)
    text = (arm / "result.json").read_text()
    (arm / "result.json").write_text(text[: len(text) // 2])  # cut short
    r = cli("compare", "--resume", str(folder), "--no-warmup")
    assert r.exit_code == 1, r.output
    assert "1 planned run(s) left no readable record (plain-32-true-r0)" in r.stderr
    report = (folder / "report.md").read_text()
    assert "| plain | 32-true | plain-32-true-r0 | no record | not valid JSON |" in report


@pytest.mark.parametrize(
    "damage",
    [
        {"repeats": "2"},
        {"repeats": -3},
        {"impls": []},
        {"impls": "plain"},
        {"impls": ["tensorflow"]},
        {"precisions": ["fp8"]},
        {"config": {"epochs": "x"}},
        {"config": {"out_dir": 5}},
        {"config": {"lr": -1}},
        {"config": {"nonsense": 1}},
        {"schema": 99},  # a newer ampcompare's
        {"schema": 99.0},  # no schema of ours: a whole number, not damage read as old
        {"schema": "99"},
        {"precisions": ["bf16-fsdp"]},  # FSDP's own rung in a comparison under DDP
    ],
    ids=lambda d: str(d),
)
def test_a_damaged_compare_plan_is_refused(tmp_path, damage):
    plan = {
        "config": {},
        "impls": ["plain"],
        "precisions": ["32-true"],
        "repeats": 1,
        "seeds": 1,
    }
    for key, value in damage.items():
        plan[key] = {**plan["config"], **value} if key == "config" else value
    (tmp_path / "compare.json").write_text(json.dumps(plan))
    said = (
        "its compare.json was written by a newer ampcompare (schema 99;"
        if type(damage.get("schema")) is int
        else "its compare.json is damaged"
    )
    one_line_exit_2(cli("compare", "--resume", str(tmp_path)), said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json"]


def test_compare_resume_reads_the_lists_as_a_fresh_compare_does(tmp_path, monkeypatch):
    folder, arm = stopped_comparison(tmp_path, monkeypatch)
    # another set of names is another comparison: refused, naming both
    one_line_exit_2(
        cli("compare", "--resume", str(folder), "--precisions", "32,bf16"),
        "--precisions 32,bf16 differs from the comparison's 32-true",
    )
    one_line_exit_2(  # a switch as the command line spells it
        cli("compare", "--resume", str(folder), "--control"),
        "--control differs from the comparison's --no-control",
    )
    # the same names, spelled as an alias and twice, are no change: the comparison finishes
    r = cli(
        "compare",
        "--resume",
        str(folder),
        "--precisions",
        "32,32-true",
        "--impls",
        "plain,plain",
        "--no-warmup",
    )
    assert r.exit_code == 0, r.output
    assert json.loads((arm / "result.json").read_text())["status"] == "ok"
