"""compare: every (impl, precision, repeat) as its own fresh process, interleaved.

A fresh process per run because apex O1 patches torch functions for the rest of its process
and peak-memory counters must start from zero. Interleaved (the arm order rotates each repeat)
so that drift on a noisy machine does not favour whichever arm always runs first.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from common import results
from common.config import Config
from common.device import resolve_device
from common.environment import environment

NOT_PASSED = ("precision", "run_id", "out_dir", "quiet", "opt_level", "repeat")


@dataclass
class Arm:
    impl: str
    precision: str
    repeat: int

    @property
    def run_id(self) -> str:
        return f"{self.impl}-{self.precision}-r{self.repeat}"


def schedule(impls, precisions, repeats) -> list[Arm]:
    arms = [(i, p) for p in precisions for i in impls]
    order = []
    for r in range(repeats):
        k = r % len(arms)
        order += [Arm(i, p, r) for i, p in arms[k:] + arms[:k]]
    return order


def child_args(cfg: Config) -> list[str]:
    """The CLI options that reproduce cfg in a child process."""
    args = []
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        if fld.name in NOT_PASSED or value is None:
            continue
        if isinstance(value, bool):  # the same "--on/--off" spelling the CLI declares
            on, off = fld.metadata["click"]["flag"].split("/")
            args.append(on if value else off)
        else:
            args += [f"--{fld.name.replace('_', '-')}", str(value)]
    return args


def unavailable_result(cfg: Config, arm: Arm, status: str, reason: str, env: dict) -> dict:
    """The record of an arm that produced no result.json of its own (env: the comparing
    process's view of the machine, so the row lands with its device)."""
    return {"schema": results.SCHEMA, "run_id": arm.run_id, "impl": arm.impl,
            "repeat": arm.repeat, "seed": cfg.seed, "status": status, "error": reason, "precision": {"requested": arm.precision, "effective": None},
            "opt_level": None,
            "config": {**cfg.to_dict(), "precision": arm.precision, "repeat": arm.repeat},
            "env": env, "epochs": [], "step_losses": [], "weights_sha256": None,
            "summary": {}}


def run_arm(cfg: Config, arm: Arm, folder: str, unavailable: dict, env: dict) -> dict:
    """Run one arm in a child process; always return (and leave on disk) a result record."""
    run_dir = os.path.join(folder, arm.run_id)
    key = (arm.impl, arm.precision)  # e.g. apex: missing altogether, or only no bf16 mode
    if key in unavailable:
        record = unavailable_result(cfg, arm, "unavailable", unavailable[key], env)
    else:
        cmd = [sys.executable, "-m", "ampcompare", arm.impl, *child_args(cfg),
               "--precision", arm.precision, "--repeat", str(arm.repeat), "--out-dir", folder,
               "--run-id", arm.run_id, "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            _, stderr = proc.communicate()
        except KeyboardInterrupt:
            stop(proc)
            raise
        lines = [line for line in stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if proc.returncode == 130:  # interrupted on its own (e.g. kill -INT): it saved its result
            raise KeyboardInterrupt
        if os.path.exists(os.path.join(run_dir, "result.json")):
            record = results.read(run_dir)
            if record["status"] != "running":
                return record
            # Killed before it could record how it ended (OOM killer, SIGKILL): keep its epochs.
            record.update(status="failed", error=f"{last} (exit code {proc.returncode})")
            results.write_json(os.path.join(run_dir, "result.json"), record)
            return record
        if proc.returncode == 2:  # a usage or environment error: this arm cannot run here
            reason = last.removeprefix("ampcompare: error: ")
            unavailable[key] = reason
            record = unavailable_result(cfg, arm, "unavailable", reason, env)
        else:
            record = unavailable_result(cfg, arm, "failed", last, env)
    os.makedirs(run_dir, exist_ok=True)
    results.write_json(os.path.join(run_dir, "result.json"), record)
    return record


def new_folder(out_dir: str) -> str:
    folder = os.path.join(out_dir, f"compare-{results.timestamp()}")
    os.makedirs(folder, exist_ok=False)
    return folder


def stop(proc: subprocess.Popen) -> None:
    """Let an interrupted child record its partial result before this process reports.
    A Ctrl-C at a terminal reaches the child too; a SIGINT sent to this process alone does not,
    so it is passed on if the child is still running after a moment. Killing it outright would
    leave its result.json saying "running"."""
    for sig, grace in ((None, 5), (signal.SIGINT, 60)):
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.communicate(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.communicate()


def compare(cfg: Config, impls, precisions, repeats: int, folder: str, show=None) -> list[dict]:
    """Run the schedule into folder; returns the records. `show(k, n, arm, elapsed)` is called
    before each arm. Ctrl-C stops after the running arm has saved its result."""
    arms = schedule(impls, precisions, repeats)
    env = environment(resolve_device(cfg), {})
    records, unavailable, start = [], {}, time.monotonic()
    for k, arm in enumerate(arms):
        if show:
            show(k, len(arms), arm, time.monotonic() - start)
        records.append(run_arm(cfg, arm, folder, unavailable, env))
    return records
