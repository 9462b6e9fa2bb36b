"""`ampcompare <arm> --devices N`: the N local processes of a DDP job, started with torch's
elastic launcher (the machinery behind torchrun). Each runs the same command under the
torchelastic environment, which is also how an external `torchrun` runs it on several nodes.

The run id, the absolute paths and every option are fixed here, before the launch, so that
all ranks belong to one run folder (rank 0 alone writes it). A rendezvous port is picked free.
Afterwards the record is made true: a job whose rank died says which rank, and how.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid

from common import results
from common.errors import UNAVAILABLE_EXIT
from common import checkpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    # Threads per rank, the same for every arm (1 against 2 threads changed losses by 7e-7).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.devices)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.devices,
                          run_id=f"ampcompare-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.1, shutdown_timeout=60)
    failures, stopped = {}, False
    try:
        elastic_launch(config, sys.executable)("-m", "ampcompare", *args)
    except ChildFailedError as e:
        failures = e.failures
    except SignalException:  # the ranks were sent the same signal and have stopped
        stopped = True
    return settle(os.path.join(cfg.out_dir, cfg.run_id), failures, stopped)


# How a rank ends when it was told to stop (Ctrl-C, or the launcher's SIGTERM once another
# rank failed): not a cause of anything.
INTERRUPTS = (130, -signal.SIGINT, -signal.SIGTERM)


def settle(run_dir: str, failures: dict, stopped: bool) -> int:
    """Make the job's record say how it ended; return the exit code."""
    causes = {rank: f for rank, f in failures.items() if f.exitcode not in INTERRUPTS}
    codes = {f.exitcode for f in causes.values()}
    if codes and codes <= {2, UNAVAILABLE_EXIT}:
        # Refused before it ran (a resume that does not match, a run another process writes):
        # the ranks said why in one line, and the folder, if any, is left as it was.
        return codes.pop() if len(codes) == 1 else 2
    try:
        record = results.read(run_dir)
        record = None if results.problem(record) else record
    except (OSError, ValueError):
        record = None
    if os.path.isdir(run_dir):  # no rank writes it now: a killed rank's temporary files go
        checkpoints.clean(run_dir, record)
    path = os.path.join(run_dir, "result.json")
    if record is not None and record["status"] == "ok":
        if causes:  # after rank 0 recorded the whole run: its numbers stand
            print(f"ampcompare: warning: {_first(causes)} after the run was recorded",
                  file=sys.stderr)
        return 0
    if stopped or (failures and not causes):
        if record is not None and record["status"] == "running":
            record.update(status="interrupted", error=None)
            results.write_json(path, record)
        return 130
    if not failures:
        return results.EXIT_CODES.get(record["status"], 1) if record else 1
    if record is None:  # it never started: the ranks said why
        return 1
    how = _first(causes)
    if record["status"] in ("running", "interrupted"):  # rank 0 was stopped by what happened
        record.update(status="failed", error=how)
    elif not how.startswith("rank 0 "):
        record["error"] = f"{how}; on rank 0: {record.get('error')}"
    results.write_json(path, record)
    print(f"ampcompare: {record['status']}: {record['error']}", file=sys.stderr)
    return results.EXIT_CODES.get(record["status"], 1)


def _first(causes: dict) -> str:
    """Which rank ended first on its own. The agent notices failures in one sweep, so their
    timestamps can tie: a signal or an exit code other than a recorded failure's 1 is the
    likelier cause."""
    rank, first = min(causes.items(),
                      key=lambda item: (item[1].exitcode == 1, item[1].timestamp, item[0]))
    return f"rank {rank} ended first ({exit_description(first.exitcode)})"


def exit_description(code: int) -> str:
    """A child's exit status in words: a negative one is the signal that ended it."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
