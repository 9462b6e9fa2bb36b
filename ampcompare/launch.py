"""`ampcompare <arm> --devices N`: the N local processes of a DDP job, started with torch's
elastic launcher (the machinery behind torchrun). Each runs the same command under the
torchelastic environment, which is also how an external `torchrun` runs it on several nodes.

The run id, the absolute paths and every option are fixed here, before the launch, so that
all ranks belong to one run folder (rank 0 alone writes it). A rendezvous port is picked free.
Afterwards the record is made true: a job whose rank died says which rank, and how, and this
process prints the job's one summary line from that record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import uuid

from dataclasses import dataclass
from typing import Optional

from common import console, distributed, ranks
from record import checkpoints, files, results
from common.errors import UNAVAILABLE_EXIT, UsageError


# How each rank is started: a fresh interpreter running this package, as torchrun would start
# it.
RANK_COMMAND = [sys.executable, "-m", "ampcompare"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_options(devices: int, job: str, port: int, config_type) -> dict:
    """LaunchConfig's arguments for a job on this node, each only where this torch's
    LaunchConfig has the field (shutdown_timeout arrived in torch 2.12; setup.cfg's floor is
    older)."""
    wanted = {
        "min_nodes": 1,
        "max_nodes": 1,
        "nproc_per_node": devices,
        "run_id": job,
        "rdzv_backend": "c10d",
        "rdzv_endpoint": f"127.0.0.1:{port}",
        "max_restarts": 0,
        "monitor_interval": 0.1,
        "shutdown_timeout": 60,  # how long a stopped rank may take to record its end
    }
    have = {f.name for f in dataclasses.fields(config_type)}
    return {k: v for k, v in wanted.items() if k in have}


def run(cfg, args: list[str]) -> int:
    """Start cfg.devices processes of `ampcompare ARGS`; the job's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Its lines ("Setting OMP_NUM_THREADS ...", "failed (exitcode: ...)") repeat what the
    # record and the line printed below say.
    for name in list(logging.root.manager.loggerDict):  # each sets its own level at import
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # Threads per rank, the same for every arm (the thread count changes a loss's last bits).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.devices)))
    os.environ[ranks.OURS] = "1"  # the ranks leave the summary line to this process
    job = f"ampcompare-{uuid.uuid4().hex[:8]}"
    config = LaunchConfig(**launch_options(cfg.devices, job, free_port(), LaunchConfig))
    failures, stopped = {}, False
    try:
        elastic_launch(config, RANK_COMMAND[0])(*RANK_COMMAND[1:], *args)
    except ChildFailedError as e:
        failures = {rank: (f.exitcode, f.timestamp) for rank, f in e.failures.items()}
    except SignalException:  # the ranks were sent the same signal and have stopped
        stopped = True
    except Exception as e:  # the launcher itself could not start them (its port taken, say)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"cannot start the {cfg.devices} processes of the job ({first})"
        ) from None
    run_dir = os.path.join(cfg.out_dir, cfg.run_id)
    return conclude(run_dir, failures, distributed.read_endings(run_dir, job), stopped)


# How a rank ends when it was told to stop (Ctrl-C, or the launcher's SIGTERM once another
# rank failed): an interrupted rank exits with 128 + the signal's number.
STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTS = {130, *(128 + s for s in STOPPING), *(-s for s in STOPPING)}
REFUSED = (2, UNAVAILABLE_EXIT)


@dataclass
class Verdict:
    """How a job ended: the status and error its record must say (None: the record stands as
    rank 0 wrote it), the exit code, and a warning to print."""

    code: int
    status: Optional[str] = None
    error: Optional[str] = None
    warning: Optional[str] = None


def judge(
    record: Optional[results.RunResult], failures: dict, endings: dict, stopped: bool
) -> Verdict:
    """How a job ended, from its record, the ranks that exited other than 0 ({rank: (exit
    code, timestamp)}), how each rank said it ended ({rank: ending}) and whether the launcher
    itself was stopped by a signal. The rank that ended first is the cause: one killed outright
    (it could say nothing) before any that said how it ended, and among those the earliest."""
    codes = {rank: code for rank, (code, _) in failures.items()}
    refusals = [c for c in codes.values() if c in REFUSED]
    if codes.get(0) in REFUSED or (
        refusals and set(codes.values()) <= INTERRUPTS | set(REFUSED)
    ):
        # Refused before it ran (a resume that does not match, a run another process writes,
        # a disk too full to start): the ranks said why in one line; nothing was written.
        return Verdict(codes[0] if codes.get(0) in REFUSED else refusals[0])
    if record is None:  # it never started: the ranks said why
        return Verdict(1)
    silent = {
        rank: failures[rank]
        for rank in codes
        if rank not in endings and codes[rank] not in INTERRUPTS
    }
    said = {rank: e for rank, e in endings.items() if e.get("status") != "ok"}
    cause = _cause(silent, said)
    if record.status == "ok":  # rank 0 recorded the whole run: its numbers stand
        return Verdict(0, warning=f"{cause[2]} after the run was recorded" if cause else None)
    if stopped:
        return Verdict(130, "interrupted", None)
    if cause is None:  # nothing failed: the run's own record says how it ended
        return Verdict(record.exit_code)
    status, _, how = cause
    return Verdict(results.EXIT_CODES.get(status, 1), status, how)


def _cause(silent: dict, said: dict):
    """(status, rank, words) of the rank whose ending caused the job's, or None."""
    if silent:  # killed outright (SIGKILL, the OOM killer): nothing else could have been first
        rank, (code, _) = min(silent.items(), key=lambda item: (item[1][1], item[0]))
        return "failed", rank, f"rank {rank} ended first ({exit_description(code)})"
    if not said:
        return None
    rank, first = min(said.items(), key=lambda item: (item[1].get("time") or 0, item[0]))
    if first["status"] == "interrupted":
        by = f"by {first['signal']}" if first.get("signal") else "by an interrupt"
        return "interrupted", rank, f"rank {rank} was stopped {by}; the others stopped with it"
    return first["status"], rank, f"rank {rank} ended first: {first.get('error')}"


def conclude(run_dir: str, failures: dict, endings: dict, stopped: bool) -> int:
    """Make the job's record say how it ended (judge); return the exit code."""
    try:
        record = results.RunResult.read(run_dir)
    except (OSError, results.NotARecord):
        record = None
    verdict = judge(record, failures, endings, stopped)
    if record is not None and os.path.isdir(run_dir):  # no rank writes it now
        checkpoints.clean(run_dir, record.to_dict())
    if verdict.warning:
        console.say(f"ampcompare: warning: {verdict.warning}", err=True)
    if (
        record is not None
        and verdict.status is not None
        and (verdict.status, verdict.error) != (record.status, record.error)
    ):
        record.status, record.error = verdict.status, verdict.error
        files.write_json(os.path.join(run_dir, "result.json"), record.to_dict())
    return verdict.code


def exit_description(code: int) -> str:
    """A child's exit status in words: a negative one is the signal that ended it."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
