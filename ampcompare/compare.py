"""compare: every (impl, precision, repeat) as its own fresh process, interleaved.

A fresh process per run because apex O1 patches torch functions for the rest of its process
and peak-memory counters must start from zero. Interleaved (the arm order rotates each repeat)
so that drift on a noisy machine does not favour whichever arm always runs first.

Each child runs in a session of its own, so that a Ctrl-C reaches this process only, once: it
passes the interrupt on, waits for the child to record what it measured, and a second signal
(or a child that does not stop) ends the child outright. Whatever a child leaves behind, its
record ends with a status that is true. compare.json holds the plan, so that
`compare --resume DIR` can keep the arms that finished and run or resume the rest.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional


from ampcompare.launch import exit_description
from ampcompare.plan import Arm, Plan, applies
from record import files, results, signals
from common.config import Config, as_args
from common.device import resolve_device
from record.environment import environment
from common import console
from record import checkpoints, rundir
from common.errors import COMPARE_CHILD, UNAVAILABLE_EXIT, Unavailable, UsageError

GRACE_S = 60  # how long an interrupted child may take to record its result
RESUMABLE = ("interrupted", "failed", "oom", "running")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How each arm is started: a fresh interpreter running this package, so that no arm inherits
# another's imports, allocator or threads.
ARM_COMMAND = [sys.executable, "-m", "ampcompare"]


def child_args(cfg: Config, exclude=None) -> list[str]:
    """The CLI options that reproduce cfg in a child process, but those in `exclude` (by
    default the ones compare sets for each arm itself: config.py declares them per_arm)."""
    args = []
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        skip = fld.metadata.get("per_arm") if exclude is None else fld.name in exclude
        if skip or value is None:
            continue
        args += as_args(fld.name, value)
    return args


def unavailable_result(
    cfg: Config, arm: Arm, status: str, reason: str, env: dict
) -> results.RunResult:
    """The record of an arm that produced no result.json of its own (env: the comparing
    process's view of the machine, so the row lands with its device)."""
    passed = arm.impl == "apex" and applies(cfg.opt_level, arm.precision)
    config = {
        **arm.options(cfg).to_dict(),
        "precision": arm.precision,
        "repeat": arm.repeat,
        "seed": arm.seed,
        "role": "control" if arm.control else "arm",
        "position": arm.position,
    }
    return results.RunResult.stand_in(
        arm.precision,
        run_id=arm.run_id,
        impl=arm.impl,
        repeat=arm.repeat,
        seed=arm.seed,
        status=status,
        error=reason,
        opt_level=cfg.opt_level if passed else None,
        config=config,
        env=env,
    )


SUPERSEDED = ".superseded"  # where a run that is started over goes (report does not look)
BUSY = rundir.BUSY


@dataclass
class Folder:
    """What an arm's folder holds before compare touches it."""

    exists: bool
    record: Optional[results.RunResult] = None  # a readable run record
    bad: Optional[str] = None  # why its result.json is not one
    busy: bool = False  # another process holds its lock


def inspect_folder(run_dir: str) -> Folder:
    if not os.path.isdir(run_dir):
        return Folder(
            exists=os.path.exists(run_dir),
            bad="it is not a folder" if os.path.exists(run_dir) else None,
        )
    if rundir.held(run_dir):
        return Folder(True, busy=True)
    try:
        return Folder(True, results.RunResult.read(run_dir))
    except FileNotFoundError:
        return Folder(True)
    except results.NotARecord as e:
        return Folder(True, bad=f"its result.json is not a run record ({e})")
    except OSError as e:
        return Folder(True, bad=f"its result.json cannot be read ({type(e).__name__})")


class Action(str, enum.Enum):
    """What compare does with an arm's attempt."""

    KEEP = "keep"  # the child's record, as it wrote it
    UPDATE = "update"  # the record on disk, with the status and error compare saw
    STAND_IN = "stand-in"  # a record written for the child, which wrote none
    START_OVER = "start over"  # its resume was refused: run it again from nothing
    LEAVE = "leave"  # another process took it: leave it alone


@dataclass
class Outcome:
    """What compare makes of an arm's attempt, and the status and error it records."""

    action: Action
    status: Optional[str] = None
    error: Optional[str] = None


def outcome(
    before: Optional[results.RunResult],
    after: Optional[results.RunResult],
    code: int,
    last: Optional[str],
    interrupted: bool,
    resuming: bool,
) -> Outcome:
    """How an arm's attempt ended, from the records before and after it, the child's exit
    code, its last line on stderr and whether compare was interrupted."""
    how = exit_description(code)
    ended = "interrupted" if interrupted else "failed"
    if last and BUSY in last:
        return Outcome(Action.LEAVE, error=last)
    if after is None:
        if code == UNAVAILABLE_EXIT and last:  # this machine cannot run it at all
            return Outcome(Action.STAND_IN, "unavailable", last)
        return Outcome(Action.STAND_IN, ended, last or how)
    if after == before:  # the child wrote nothing
        if resuming and code in (2, UNAVAILABLE_EXIT):
            return Outcome(Action.START_OVER, error=last or how)
        why = f"{last}; {how}" if last else how
        return Outcome(
            Action.UPDATE,
            ended,
            f"{why}, before it wrote anything; what an earlier attempt measured is kept",
        )
    if after.status != "running":
        return Outcome(Action.KEEP)
    # Gone before it could record how it ended (OOM killer, SIGKILL, a hang we ended).
    return Outcome(Action.UPDATE, ended, f"{last}; {how}" if last else how)


def run_arm(cfg: Config, arm: Arm, folder: str, unavailable: dict, env: dict, warm=None):
    """Run (or, with a checkpoint left by an earlier attempt, resume) one arm in a child
    process. Returns its record, also left on disk (None: the arm was skipped, and why was
    said), and whether to stop comparing. A run is never deleted: one that must start over
    is moved into .superseded/ first, and one another process writes is left alone."""
    run_dir = os.path.join(folder, arm.run_id)
    key = (arm.impl, arm.precision)  # e.g. apex: missing altogether, or only no bf16 mode
    found = inspect_folder(run_dir)
    if found.busy or found.bad:
        _warn(
            f"skipped {run_dir}: {BUSY if found.busy else found.bad}; it is left as it is "
            f"(finish or move it, then compare --resume)"
        )
        return found.record, False
    before = found.record
    if before is not None and before.status == "ok":
        return before, False  # finished in an earlier attempt: kept
    if key not in unavailable and (why := known_unavailable(cfg, arm)):
        unavailable[key] = why
    if key in unavailable:
        if found.exists and not _supersede(folder, run_dir, "this machine cannot run it"):
            return before, False
        return _save(
            run_dir, unavailable_result(cfg, arm, "unavailable", unavailable[key], env)
        ), False
    resuming = bool(before is not None and before.checkpoint and before.status in RESUMABLE)
    if found.exists and not resuming:
        if not _supersede(folder, run_dir, "it left nothing to continue from"):
            return before, False
    if warm is not None and warm(arm):  # the warm-up, before the first timed run: interrupted
        return None, True
    code, last, interrupted = _attempt(cfg, arm, folder, run_dir, resuming)
    after = inspect_folder(run_dir).record
    if os.path.isdir(run_dir) and not rundir.held(run_dir):  # a killed child's leftovers go
        checkpoints.clean(run_dir, after.to_dict() if after else None)
    result = outcome(before if resuming else None, after, code, last, interrupted, resuming)
    stop = interrupted or code == 130  # also a child interrupted on its own
    if result.action is Action.LEAVE:
        _warn(f"skipped {run_dir}: {result.error}")
        return after, stop
    if result.action is Action.START_OVER:
        _warn(f"{run_dir}: its resume was refused ({result.error}); starting it over")
        if stop:
            return after, stop
        if not _supersede(folder, run_dir, "its resume was refused"):
            return after, stop
        return run_arm(cfg, arm, folder, unavailable, env, warm)
    if result.action is Action.KEEP:
        return after, stop
    if result.action is Action.UPDATE:
        after.status, after.error = result.status, result.error
        return _save(run_dir, after), stop
    if result.status == "unavailable":
        unavailable[key] = result.error
    return _save(run_dir, unavailable_result(cfg, arm, result.status, result.error, env)), stop


def known_unavailable(cfg: Config, arm: Arm) -> Optional[str]:
    """Why the arm cannot run here, where this process can tell without starting it: apex's
    checks (no bf16 mode, no apex.amp, no CUDA) need no process of seconds of imports to say
    the same. None: the arm's own process decides."""
    if arm.impl != "apex":
        return None
    from apex_impl import opt_levels

    opt_level = cfg.opt_level if applies(cfg.opt_level, arm.precision) else None
    try:
        with warnings.catch_warnings():  # apex warns that amp is deprecated as it is imported
            warnings.simplefilter("ignore")
            opt_levels.check(
                dataclasses.replace(cfg, precision=arm.precision, opt_level=opt_level)
            )
    except Unavailable as e:
        return str(e)
    except UsageError:  # the arm's own process says it, with its exit code
        return None
    return None


def _attempt(cfg: Config, arm: Arm, folder: str, run_dir: str, resuming: bool):
    """The arm's child process, to its end: (exit code, last stderr line, interrupted)."""
    if resuming:
        cmd = [arm.impl, "--resume", run_dir]
    else:
        cmd = [
            arm.impl,
            *child_args(arm.options(cfg)),
            "--precision",
            arm.precision,
            "--seed",
            str(arm.seed),
            "--repeat",
            str(arm.repeat),
            "--role",
            "control" if arm.control else "arm",
            "--position",
            str(arm.position),
            "--out-dir",
            folder,
            "--run-id",
            arm.run_id,
        ]
        if arm.impl == "apex" and applies(cfg.opt_level, arm.precision):
            cmd += ["--opt-level", cfg.opt_level]
    cmd = [*ARM_COMMAND, *cmd, "--quiet", "--no-keep-checkpoint"]
    # The child runs from the project (python -m ampcompare), and imports a --model of the
    # user's own from the folder compare was started in, as the arm would.
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=signals.die_with_parent,
        env={**os.environ, COMPARE_CHILD: "1", "PYTHONPATH": path},
    )
    stderr, interrupted = _wait(proc)
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].removeprefix("ampcompare: error: ") if lines else None
    return proc.returncode, last, interrupted


def _supersede(folder: str, run_dir: str, why: str) -> bool:
    """Move a run that is started over out of the way, whole, into .superseded/. False, and
    said, where it cannot be moved (.superseded a file, the folder read-only): then it is
    left as it is and not run again."""
    aside = os.path.join(folder, SUPERSEDED)
    name = os.path.basename(run_dir)
    try:
        os.makedirs(aside, exist_ok=True)
        for n in range(1, 10000):
            target = os.path.join(aside, f"{name}-{n}")
            if not os.path.exists(target):
                break
        os.rename(run_dir, target)
    except OSError as e:
        where = f"{aside} is not a folder" if os.path.isfile(aside) else e.strerror
        _warn(f"skipped {run_dir}: {why}, but it cannot be moved aside ({where}); it is left")
        return False
    _warn(f"{run_dir}: {why}; moved to {target} and run again")
    return True


def _warn(line: str) -> None:
    console.say(f"ampcompare: warning: {line}", err=True)


def _wait(proc: subprocess.Popen) -> tuple[str, bool]:
    """Wait for the child, reading its stderr. The first signal to this process is passed on
    as SIGINT (with SIGCONT first, for a stopped child); a second one, or GRACE_S without an
    end, kills the child's whole process group. Returns (stderr, whether it was interrupted)."""
    seen, caught, asked, killed = signals.received(), 0, None, False
    while True:
        try:
            _, stderr = proc.communicate(timeout=0.2)
            return stderr, asked is not None
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # signals not installed (compare called in-process)
            caught += 1
        count = signals.received() - seen + caught
        if count and asked is None:
            asked = time.monotonic()
            _signal(proc, signal.SIGCONT, group=True)
            _signal(proc, signal.SIGINT)
        if (
            not killed
            and asked is not None
            and (count > 1 or time.monotonic() - asked > GRACE_S)
        ):
            _signal(proc, signal.SIGCONT, group=True)
            _signal(proc, signal.SIGKILL, group=True)
            killed = True


def _signal(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
    try:
        if group:  # the child and its data loader workers: its session is its group
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _save(run_dir: str, record: results.RunResult) -> results.RunResult:
    """Leave the record on disk; a full disk or a read-only folder costs this file, not the
    comparison: the record still reaches the report's in-memory list."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        files.write_json(os.path.join(run_dir, "result.json"), record.to_dict())
    except OSError as e:
        console.say(
            f"ampcompare: warning: could not write {run_dir}/result.json ({e.strerror})",
            err=True,
        )
    return record


WARMUP = ".warmup"  # where the untimed warm-up run goes, removed once it ends


def warm_up(cfg: Config, arm: Arm, folder: str) -> bool:
    """One untimed process before the first timed run (as hyperfine's --warmup): the arm that
    is about to run, for one short epoch, so that what the first process of a session pays
    (files read into the page cache, a cold CPU) falls on no measured run. Its folder is
    removed. Returns whether it was interrupted."""
    short = dataclasses.replace(
        cfg, epochs=1, limit_train_batches=3, limit_test_batches=1, checkpoint=False
    )
    if arm.impl == "apex":  # may well be unavailable here: the plain loop warms up instead
        arm = dataclasses.replace(arm, impl="plain", control=False)
    aside = os.path.join(folder, WARMUP)
    try:
        _, _, interrupted = _attempt(short, arm, aside, os.path.join(aside, arm.run_id), False)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return interrupted


def compare(plan: Plan, show=None, warmup: bool = True) -> list[dict]:
    """Run the plan's arms into its folder; returns their records. `show(k, n, arm, elapsed)`
    is called before each arm; with `warmup`, one untimed run comes before the first arm
    that starts a process. An interrupt stops after the running arm has recorded its
    result."""
    arms = plan.arms()
    env = environment(resolve_device(plan.cfg), {})
    records, unavailable, start = [], {}, time.monotonic()
    pending = [warmup]

    def warm(arm: Arm) -> bool:
        if not pending[0]:
            return False
        pending[0] = False
        return warm_up(plan.cfg, arm, plan.folder)

    for k, arm in enumerate(arms):
        if show:
            show(k, len(arms), arm, time.monotonic() - start)
        record = None
        try:
            with signals.deferred():  # a signal now is passed to the child by _wait
                record, stop = run_arm(plan.cfg, arm, plan.folder, unavailable, env, warm)
                if record is not None:
                    records.append(record)
        except KeyboardInterrupt:  # held back while the arm ran: it has recorded its end
            stop = True
        ended = record is not None and record.status != "interrupted"
        if k == len(arms) - 1 and (ended or (record is None and not stop)):
            signals.absorb_from_now()  # every arm has ended: a signal now interrupts nothing
            stop = False
        if stop:
            raise KeyboardInterrupt
    signals.absorb_from_now()
    return records


def lock(ctx, folder: str) -> None:
    """Hold folder until the command ends: one compare per folder, never two."""
    try:
        held = rundir.lock(folder, f"--resume {folder}: another compare is running there")
    except OSError as e:
        raise UsageError(f"cannot lock {folder}: {e.strerror}") from None
    ctx.call_on_close(lambda: os.close(held))


def progress_lines(bar, planned):
    """What compare shows before each arm: a bar on a terminal, else a line per arm."""

    def show(k, n, arm, elapsed):
        seed = f" seed {arm.seed}" if planned.seeds > 1 else ""
        name = "plain (control)" if arm.control else "plain (DDP)" if arm.ddp else arm.impl
        what = f"{name} {arm.precision}{seed} repeat {arm.repeat + 1}"
        if not bar.on:
            console.say(f"[{k + 1}/{n}] {what}  (elapsed {elapsed:.0f}s)", err=True)
            return
        if k == 0:
            bar.task(what, n)
        bar.update(completed=k, description=f"arm {k + 1}/{n}: {what}")

    return show
