"""DDP on torch.distributed, 2 processes, gloo, CPU: the plain loop, Lightning and Fabric give
bitwise-identical per-step losses and weights (docs/equivalence.md), a job resumes, and a
job that loses a rank or gets Ctrl-C ends with a true record and no process left. Every job runs
through the command line (`--devices 2` starts the processes with torch's elastic launcher),
under a time limit, so that a hung process group fails a test instead of blocking the suite.
Every job and each of its ranks is a process of its own, started as a user starts it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ampcompare import launch
from record.results import RunResult
from tests import faults
from tests.conftest import AMPCOMPARE, ROOT, run_cli

JOB = (
    "--devices 2 --dataset synthetic --model small --synthetic-size 256 --batch-size 16 "
    "--limit-train-batches 3 --limit-test-batches 2 --accelerator cpu --quiet"
).split()
LIMIT = 240  # seconds for any one job


def job(arm, out, run_id, *args, expect=0):
    command = [arm, *JOB, "--out-dir", str(out), "--run-id", run_id, *args]
    proc = run_cli(command, timeout=LIMIT)
    assert proc.returncode == expect, proc.stderr[-3000:]
    with open(out / run_id / "result.json") as f:
        return json.load(f)


def gone(pids):
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
)
def test_plain_lightning_and_fabric_ddp_are_bitwise_identical(tmp_path, precision):
    # fp16 has no fast CPU kernels: 2 images a rank instead of 8; 16-true with SGD, as Adam
    # diverges there (tests/test_ladder.py). The true rungs all-reduce half gradients on gloo.
    small = ["--batch-size", "4"] if precision.startswith("16-") else []
    if precision == "16-true":
        small += ["--optimizer", "sgd", "--lr", "0.05"]
    # Accelerate trains fp32 when asked for fp16 on a CPU: refused there (tests/test_accelerate)
    arms = ("plain", "lightning", "fabric") + (
        ("accelerate",) if precision != "16-mixed" else ()
    )
    runs = {
        arm: job(arm, tmp_path, arm, "--precision", precision, "--epochs", "2", *small)
        for arm in arms
    }
    for arm, record in runs.items():
        assert record["status"] == "ok", (arm, record["error"])
        assert record["env"]["world_size"] == 2 and record["env"]["backend"] == "gloo"
        assert len(record["epochs"][0]["peak_memory_bytes_per_rank"]) == 2
        assert gone(record["env"]["pids"])
    plain = runs["plain"]
    assert len(plain["step_losses"]) == 6
    for arm in arms[1:]:
        assert runs[arm]["step_losses"] == plain["step_losses"], arm
        assert runs[arm]["weights_sha256"] == plain["weights_sha256"], arm
        for a, b in zip(runs[arm]["epochs"], plain["epochs"]):
            assert (a["test_loss"], a["test_acc"], a["loss_scale"]) == (
                b["test_loss"],
                b["test_acc"],
                b["loss_scale"],
            ), arm


def test_a_ddp_job_stopped_mid_epoch_resumes_bitwise(tmp_path, monkeypatch):
    straight = job("plain", tmp_path, "straight", "--precision", "32", "--epochs", "2")
    faults.inject_children(monkeypatch, epoch=1, action="interrupt", step=2)
    stopped = job(
        "plain", tmp_path, "stopped", "--precision", "32", "--epochs", "2", expect=130
    )
    assert stopped["status"] == "interrupted" and stopped["checkpoint"]["epochs"] == 1
    monkeypatch.delenv(faults.ENV)
    # A resume every rank refuses: one line, exit 2, and the stopped run as it was.
    before = (tmp_path / "stopped" / "result.json").read_bytes()
    proc = run_cli(
        ["plain", "--resume", str(tmp_path / "stopped"), "--lr", "0.5", "--quiet"],
        timeout=LIMIT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lr 0.5 differs from the stopped run's" in lines[0], lines
    assert (tmp_path / "stopped" / "result.json").read_bytes() == before
    proc = run_cli(["plain", "--resume", str(tmp_path / "stopped"), "--quiet"], timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "stopped" / "result.json") as f:
        resumed = json.load(f)
    assert resumed["status"] == "ok" and resumed["env"]["world_size"] == 2
    assert resumed["step_losses"] == straight["step_losses"]
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_a_killed_rank_fails_the_job_at_once_and_leaves_no_process(tmp_path, monkeypatch):
    faults.inject_children(monkeypatch, epoch=1, action="exit", step=1, rank=1)
    start = time.monotonic()
    record = job("lightning", tmp_path, "k", "--precision", "32", "--epochs", "5", expect=1)
    assert time.monotonic() - start < 90
    assert record["status"] == "failed"
    assert record["error"].startswith("rank 1 ended first (exit code 137)")
    assert len(record["epochs"]) == 1 and gone(record["env"]["pids"])


def test_ctrl_c_to_a_ddp_job_is_interrupted_and_resumable(tmp_path):
    args = [
        *AMPCOMPARE,
        "fabric",
        *JOB,
        "--precision",
        "32",
        "--epochs",
        "200",
        "--limit-train-batches",
        "8",
        "--out-dir",
        str(tmp_path),
        "--run-id",
        "c",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    path = tmp_path / "c" / "result.json"
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline and not (
        path.exists() and json.loads(path.read_text())["epochs"]
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # to the launcher, as a terminal's Ctrl-C would be
    _, stderr = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 130, stderr[-3000:]
    record = json.loads(path.read_text())
    assert record["status"] == "interrupted" and record["checkpoint"]
    assert gone(record["env"]["pids"])


def start_job(arm, tmp_path, run_id="live"):
    """A long DDP job, running: (its process, its result.json, the ranks' pids)."""
    args = [
        *AMPCOMPARE,
        arm,
        *JOB,
        "--precision",
        "32",
        "--epochs",
        "500",
        "--out-dir",
        str(tmp_path),
        "--run-id",
        run_id,
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    path = tmp_path / run_id / "result.json"
    deadline = time.monotonic() + LIMIT
    while not (path.exists() and json.loads(path.read_text())["epochs"]):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    return proc, path, json.loads(path.read_text())["env"]["pids"]


def test_a_second_resume_of_a_running_job_writes_nothing(tmp_path):
    proc, path, _ = start_job("plain", tmp_path)
    try:
        for _ in range(3):
            before = path.read_bytes()
            second = run_cli(["plain", "--resume", str(path.parent), "--quiet"], timeout=LIMIT)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "another process is writing that run" in lines[0], lines
            record = json.loads(path.read_text())
            assert record["status"] == "running" and record["error"] is None
            assert json.loads(before)["pid"] == record["pid"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=LIMIT)
    assert proc.returncode == 130


def test_a_disk_too_full_to_start_a_job_is_exit_2(tmp_path, monkeypatch):
    faults.inject_children(monkeypatch, epoch=0, action="enospc", step="start")
    proc = run_cli(
        ["plain", *JOB, "--precision", "32", "--out-dir", str(tmp_path), "--run-id", "full"],
        timeout=LIMIT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot start a run in" in proc.stderr and "No space left on device" in proc.stderr
    assert not (tmp_path / "full").exists()


@pytest.mark.parametrize(
    "arm,rank,sig,status,words,code",
    [
        ("plain", 1, signal.SIGTERM, "interrupted", "rank 1 was stopped by SIGTERM", 130),
        ("fabric", 0, signal.SIGTERM, "interrupted", "rank 0 was stopped by SIGTERM", 130),
        ("plain", 1, signal.SIGKILL, "failed", "rank 1 ended first (killed by SIGKILL)", 1),
        ("lightning", 1, signal.SIGHUP, "interrupted", "rank 1 was stopped by SIGHUP", 130),
    ],
)
def test_a_signal_to_one_rank_is_named_alike_in_the_record_and_the_line(
    tmp_path, arm, rank, sig, status, words, code
):
    proc, path, pids = start_job(arm, tmp_path)
    os.kill(pids[rank], sig)
    out, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == code, err[-3000:]
    record = json.loads(path.read_text())
    assert record["status"] == status and record["error"].startswith(words), record["error"]
    summary = [line for line in out.splitlines() if line.startswith(f"{arm} 32-true: ")]
    assert len(summary) == 1 and summary[0].startswith(f"{arm} 32-true: {status},"), out
    assert f"error: {record['error']}" in err
    assert gone(pids) and not (path.parent / ".ranks").exists()


RUNNING = {"status": "running", "error": None}


@pytest.mark.parametrize(
    "record,failures,endings,stopped,expected",
    [
        # rank 0 refused (a live run's lock, a full disk): nothing to write, whatever rank 1 did
        (RUNNING, {0: (2, 5), 1: (1, 5)}, {}, False, (2, None, None)),
        (None, {0: (2, 5), 1: (-15, 5)}, {}, False, (2, None, None)),
        (None, {0: (3, 5), 1: (143, 5)}, {}, False, (3, None, None)),
        (None, {0: (1, 5)}, {}, False, (1, None, None)),  # it never started
        # one rank killed outright: it could say nothing, so it was first
        (
            RUNNING,
            {1: (-9, 7), 0: (143, 7)},
            {0: {"status": "interrupted", "signal": "SIGTERM", "time": 8.0}},
            False,
            (1, "failed", "rank 1 ended first (killed by SIGKILL)"),
        ),
        # a signal to one rank: the earliest to say how it ended is the cause
        (
            RUNNING,
            {1: (143, 7), 0: (1, 7)},
            {
                1: {"status": "interrupted", "signal": "SIGTERM", "time": 6.0},
                0: {
                    "status": "failed",
                    "error": "RuntimeError: Connection reset by peer",
                    "time": 6.5,
                },
            },
            False,
            (130, "interrupted", "rank 1 was stopped by SIGTERM; the others stopped with it"),
        ),
        (
            RUNNING,
            {0: (1, 7), 1: (143, 7)},
            {
                0: {"status": "oom", "error": "out of memory", "time": 6.0},
                1: {"status": "interrupted", "signal": "SIGTERM", "time": 6.5},
            },
            False,
            (1, "oom", "rank 0 ended first: out of memory"),
        ),
        # Ctrl-C to the launcher: every rank stopped with it
        (RUNNING, {0: (130, 7), 1: (130, 7)}, {}, True, (130, "interrupted", None)),
        # rank 0 had recorded the whole run: it stands
        ({"status": "ok", "error": None}, {1: (-9, 7)}, {}, False, (0, None, None)),
    ],
)
def test_how_a_job_ended(record, failures, endings, stopped, expected):
    ran = {"requested": "32-true", "effective": "32-true"}
    record = record and RunResult.from_dict({"precision": ran, **record})
    verdict = launch.judge(record, failures, endings, stopped)
    assert (verdict.code, verdict.status, verdict.error) == expected


def test_a_rendezvous_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {
            **os.environ,
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(busy.getsockname()[1]),
            "TORCHELASTIC_USE_AGENT_STORE": "0",
        }
        proc = subprocess.run(
            [*AMPCOMPARE, "plain", *JOB, "--out-dir", str(tmp_path)],
            cwd=ROOT,
            env=env,
            text=True,
            capture_output=True,
            timeout=LIMIT,
        )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.startswith("ampcompare: error: cannot join the process group at 127.0.0.1:")
        and proc.stderr.count("\n") == 1
    ), proc.stderr
    assert not any(tmp_path.iterdir())


WAITER = """
import datetime, os, sys, time
import torch.distributed as dist
sys.path.insert(0, {root!r})
from common import data
from record import prepare
from common.distributed import World

class Cfg:
    dataset, download = "cifar10", True

def load(cfg):  # a slow download on local rank 0; the other rank must find it done
    rank = int(os.environ["RANK"])
    if rank == 0:
        time.sleep(2)
        open({marker!r}, "w").close()
    elif not os.path.exists({marker!r}):
        raise SystemExit("rank 1 read the data before rank 0 had it")
    return rank

data.load = load
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = int(os.environ["RANK"])
assert prepare._load(Cfg, World(rank, rank, 2, 2, "gloo")) == rank
dist.destroy_process_group()
"""


def test_under_torchrun_one_process_a_node_downloads_and_the_others_wait(tmp_path):
    script = tmp_path / "waiter.py"
    script.write_text(WAITER.format(root=str(ROOT), marker=str(tmp_path / "downloaded")))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(launch.free_port()),
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_launcher_passes_only_the_fields_this_torchs_launchconfig_has():
    # torch 2.11's LaunchConfig has no shutdown_timeout (it came in 2.12): passing it made
    # every multi-process job a TypeError there.
    import dataclasses

    from torch.distributed.launcher.api import LaunchConfig

    from ampcompare import launch

    @dataclasses.dataclass
    class Older:
        min_nodes: int
        max_nodes: int
        nproc_per_node: int
        run_id: str = ""
        rdzv_backend: str = "static"
        rdzv_endpoint: str = ""
        max_restarts: int = 3
        monitor_interval: float = 30

    options = launch.launch_options(2, "job", 12345, Older)
    assert "shutdown_timeout" not in options and options["nproc_per_node"] == 2
    Older(**options)  # builds
    here = launch.launch_options(2, "job", 12345, LaunchConfig)
    assert LaunchConfig(**here).nproc_per_node == 2
    names = {f.name for f in dataclasses.fields(LaunchConfig)}
    assert ("shutdown_timeout" in here) == ("shutdown_timeout" in names)
