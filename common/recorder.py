"""The folder of one run (result.json, checkpoint-<epochs>.pt, error.log) and statuses that
are true.

As a context manager the Recorder turns the way a loop ended (normally, Ctrl-C, SIGTERM or
SIGHUP, out of memory, divergence, a full disk, any error) into the recorded status. A status
is final only once everything it names is on disk: `ok` is written after the last epoch's
checkpoint and weights hash. At the end of every epoch the checkpoint and result.json are
written as a pair that a crash at any instant leaves whole (common/checkpoints.py); an epoch's
row joins the record's epochs only with its checkpoint. A reserve file keeps room for the last
record when the disk fills up.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import resource
import traceback
from dataclasses import fields
from typing import Callable, Optional

import torch

from common import (checkpoints, distributed, flops, metrics, model_spec, peaks, resume,
                    signals)
from common.checkpoints import LOCK, RESERVE
from common.environment import environment
from common.errors import UsageError
from common.results import (SCHEMA, RunResult, new_run_id, stage, summarize, weights_sha256,
                            write_json)

OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def out_of_memory(kind, exc) -> bool:
    """An allocation that failed: torch's own error, Python's, or the CPU allocator's, which
    torch raises as a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return issubclass(kind, OOM) or (issubclass(kind, RuntimeError)
                                     and "can't allocate memory" in str(exc))
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Recorder:
    """Owns the run folder and result.json of one run, new or resumed."""

    def __init__(self, cfg, impl: str, policy, device: torch.device, switches: dict,
                 opt_level: Optional[str] = None, world: distributed.World = distributed.World(),
                 model: Optional[dict] = None):
        self.cfg, self.device, self.world = cfg, device, world
        self.writes = world.main  # with several processes, rank 0 alone writes
        self.lock = None
        env = {**environment(device, switches), **world.to_dict()}
        if world.size > 1:
            env["pids"] = distributed.gather_ints(os.getpid(), device)
        self.resumed: Optional[dict] = None  # the checkpoint a resumed run continues from
        self.checkpoint_path: Optional[str] = None  # and its file
        if cfg.resume:
            self.run_dir = os.path.abspath(cfg.resume)
            if self.writes:  # one process continues a run, never two
                self._lock()
            try:  # self.stored: put back if the resume is refused while building
                self.result, self.resumed, self.stored = _open_stopped_run(self.run_dir, cfg,
                                                                           impl, env, model)
            except BaseException:
                self.unlock()
                raise
            self.checkpoint_path = os.path.join(self.run_dir, self.result.checkpoint["file"])
        else:
            run_id = cfg.run_id or new_run_id(impl, policy.effective)
            self.run_dir = os.path.join(cfg.out_dir, run_id)
            self.result = RunResult(schema=SCHEMA, run_id=run_id, impl=impl, repeat=cfg.repeat,
                                    seed=cfg.seed, status="running", error=None,
                                    precision=policy.to_dict(), opt_level=opt_level,
                                    config=cfg.to_dict(), env=env)
        self.result.pid = os.getpid()
        self.result.model = model
        self.result.flops = _flops(cfg, self.result.precision["effective"], self.result.env)
        self.path = os.path.join(self.run_dir, "result.json")
        self.fresh = True  # no epoch has ended in this process yet: the next is a warm-up
        self.saving = None  # the hash of the weights being saved, for state()
        self.pending, self.pending_losses = [], []  # the epoch whose checkpoint is being saved

    @property
    def start_epoch(self) -> int:
        return len(self.result.epochs)

    def __enter__(self) -> "Recorder":
        try:
            with signals.deferred():
                metrics.reset_peak_memory(self.device)
                if self.resumed:
                    _set_rng(self.resumed["ampcompare"]["rng"])
                if self.writes:
                    self._start()
        except KeyboardInterrupt:  # held back until the record existed: record it
            self.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
            raise
        return self

    def _start(self) -> None:
        """The folder (a new one, or the resumed one cleared of what a killed process left),
        its lock, the room for the last record and the first record. A disk too full for
        that is a usage error, and a new folder is taken away again."""
        made = None
        try:
            if self.resumed:
                checkpoints.clean(self.run_dir, self.stored)
            else:
                made = _missing_top(self.run_dir)
                os.makedirs(self.run_dir, exist_ok=False)
                self._lock()
            self._reserve(1 << 20)
            self.write()
        except FileExistsError:
            raise UsageError(f"{self.run_dir} already exists; choose another --run-id, or "
                             f"continue it with --resume {self.run_dir}") from None
        except OSError as e:
            self.unlock()
            if made:
                shutil.rmtree(made, ignore_errors=True)  # only the folders made just now
            raise UsageError(f"cannot start a run in {self.run_dir}: {e.strerror}") from None

    def state(self) -> dict:
        """The measurements so far, the options and the hash of the weights being saved, for
        the checkpoint: what a resumed run continues from, and checks the record against."""
        return {"ampcompare": {"schema": SCHEMA, "epochs": self.result.epochs + self.pending,
                               "step_losses": self.result.step_losses + self.pending_losses,
                               "rng": _get_rng(), "config": self.cfg.to_dict(),
                               "weights_sha256": self.saving}}

    def end_epoch(self, row: dict, losses: list, model: torch.nn.Module,
                  save: Optional[Callable[[str], None]] = None, everyone: bool = False) -> None:
        """Record a finished epoch: its row and step losses, the hash of the weights and (unless
        --no-checkpoint) the checkpoint that `save(path)` writes, which must hold state(). The
        row joins the record's epochs together with its checkpoint; interrupted before that,
        it is kept as `unsaved_epoch` (a resume redoes it). Raises Diverged after the row is
        recorded; the last good checkpoint stays. With several processes every rank calls this
        and rank 0 writes; `everyone`: a framework whose save is a collective (it writes on
        rank 0 only) gets called on every rank."""
        row["warmup"], self.fresh = self.fresh, False
        per_image, peak = self.result.flops["per_image"], self.result.flops["peak_tflops"]
        achieved = per_image * row["images_per_s"] / 1e12 \
            if row["images_per_s"] and per_image else None
        row["achieved_tflops"] = achieved
        row["mfu"] = achieved / peak if achieved is not None and peak else None
        reason = metrics.divergence(row, losses)  # the same on every rank: the row is the job's
        checkpointing = self.cfg.checkpoint and save is not None and not reason
        if not checkpointing:
            self._add(row, losses)
            if reason:
                raise metrics.Diverged(reason)
        if not self.writes:
            if checkpointing:
                if everyone:
                    save(os.devnull)  # the framework writes nothing here, and waits for rank 0
                self._add(row, losses)
            if len(self.result.epochs) >= self.cfg.epochs:
                signals.settled()  # as rank 0 does: the job's last epoch is done
            return
        # With several ranks, rank 0's weights: BatchNorm's running statistics are each rank's.
        weights, info, staged = weights_sha256(model), self.result.checkpoint, None
        old = checkpoints.named(self.result.to_dict())
        try:
            if checkpointing:
                self.pending, self.pending_losses, self.saving = [row], list(losses), weights
                staged = self._temp(".pt")
                self._save(save, staged)
                done = len(self.result.epochs) + 1
                info = {"file": checkpoints.name(done), "epochs": done,
                        "sha256": checkpoints.synced_sha256(staged), "weights_sha256": weights}
            epochs, step_losses = self.result.epochs + self.pending, \
                self.result.step_losses + self.pending_losses
            record = {**self.result.to_dict(), "epochs": epochs, "step_losses": step_losses,
                      "summary": summarize(epochs, self.result.env), "weights_sha256": weights,
                      "checkpoint": info, "weights_epochs": len(epochs), "unsaved_epoch": None}
            checkpoints.commit(self.run_dir, record, staged, info and info["file"])
            staged = None
            if self.pending:
                self._add(*self._take_pending())
            self.result.weights_sha256, self.result.checkpoint = weights, info
            self.result.weights_epochs = len(self.result.epochs)
            self.result.unsaved_epoch = None
            if old and info and old != info["file"]:
                checkpoints.remove(os.path.join(self.run_dir, old))
            self._reserve(4 * os.path.getsize(self.path) + (64 << 10))
        finally:
            if staged is not None:
                checkpoints.remove(staged)
            if self.pending:  # not committed: measured, but no checkpoint holds it
                self.result.unsaved_epoch = self.pending[0]
                self._take_pending()
            self.saving = None
        if len(self.result.epochs) >= self.cfg.epochs:
            signals.settled()  # the last epoch is on disk: nothing is left to interrupt

    def _add(self, row: dict, losses: list) -> None:
        self.result.epochs.append(row)
        self.result.step_losses.extend(losses)
        self.result.summary = summarize(self.result.epochs, self.result.env)

    def _take_pending(self) -> tuple[dict, list]:
        row, losses = (self.pending or [None])[0], self.pending_losses
        self.pending, self.pending_losses = [], []
        return row, losses

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, UsageError):
            # A bad option or a missing piece found while building (Lightning choosing another
            # precision, say): one line and exit 2, and the folder as it was.
            if self.writes:
                if self.resumed:
                    write_json(self.path, self.stored)
                else:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
            self.unlock()
            return False
        signals.settled()  # the run has ended: a signal now would only cut this record short
        if kind is None:
            self.result.status = "ok"
        elif issubclass(kind, KeyboardInterrupt) or signals.received():
            # With several ranks, a peer that stopped on the same signal can surface here as a
            # failed collective first.
            self.result.status = "interrupted"
        else:
            self.result.status = ("oom" if out_of_memory(kind, exc) else
                                  "diverged" if issubclass(kind, metrics.Diverged) else "failed")
            self.result.error = self._describe(kind, exc)
        if self.world.size > 1:
            distributed.mark_ending(self.run_dir, self.world.rank, self.result.status,
                                    self.result.error, signals.first())
        if not self.writes:
            return kind is None or issubclass(kind, (Exception, KeyboardInterrupt))
        checkpoints.remove(os.path.join(self.run_dir, RESERVE))  # the room for this record
        drop = checkpoints.named(self.result.to_dict()) \
            if self.result.status == "ok" and not self.cfg.keep_checkpoint else None
        if drop:  # the record stops naming the file before the file goes
            self.result.checkpoint = None
        try:
            if self.result.status in ("failed", "oom"):
                with open(os.path.join(self.run_dir, "error.log"), "w", encoding="utf-8") as f:
                    f.write("".join(traceback.format_exception(kind, exc, tb)))
            self.write()
            if drop:
                checkpoints.remove(os.path.join(self.run_dir, drop))
        except OSError as e:
            self.result.error = (f"{self.result.error or ''}; and the record could not be "
                                 f"updated: {e.strerror}").lstrip("; ")
            if self.result.status == "ok":
                self.result.status = "failed"
        self.unlock()
        # Exceptions are the run's status now; SystemExit and the like still propagate.
        return kind is None or issubclass(kind, (Exception, KeyboardInterrupt))

    def _lock(self) -> None:
        self.lock = lock(self.run_dir, f"{self.run_dir}: another process is writing that run")

    def unlock(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def _describe(self, kind, exc) -> str:
        if out_of_memory(kind, exc):
            return (f"out of memory at batch size {self.cfg.batch_size}: {exc} "
                    f"({_memory_figures(self.device)})")
        if issubclass(kind, OSError) and exc.errno in DISK_FULL:
            return (f"disk full ({exc.strerror}) while writing {exc.filename or 'a file'}; "
                    f"the last complete checkpoint and record are kept")
        if issubclass(kind, metrics.Diverged):
            return str(exc)
        return f"{kind.__name__}: {exc}"

    def _save(self, save: Callable[[str], None], path: str) -> None:
        try:
            save(path)
        except Exception as e:
            # torch.save's zip writer reports a full disk as a RuntimeError ("unexpected pos").
            stat = os.statvfs(self.run_dir)
            if stat.f_bavail * stat.f_frsize < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the checkpoint") from e
            raise

    def _temp(self, suffix: str) -> str:
        return stage(os.path.join(self.run_dir, "x" + suffix), lambda f: None)

    def _reserve(self, size: int) -> None:
        """Keep `size` bytes allocated in the run folder; the last record is written into the
        room they free. Where the disk cannot give them, the run is better stopped now."""
        path = os.path.join(self.run_dir, RESERVE)
        if os.path.exists(path) and os.path.getsize(path) >= size:
            return
        with open(path, "ab") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise OSError(e.errno, e.strerror, path) from None
                f.write(b"\0" * (size - f.tell()))  # a filesystem without fallocate

    def write(self) -> None:
        write_json(self.path, self.result.to_dict())


def _flops(cfg, precision: str, env: dict) -> dict:
    """FLOPs of one step of the whole job (or why there is no count), and the peak of all its
    devices together."""
    step, counted = flops.per_step(model_spec.builder(model_spec.parse(cfg.model)),
                                   cfg.batch_size)
    peak, what = peaks.peak(env, precision)
    devices = env.get("world_size", 1)
    if peak is not None and devices > 1:
        peak, what = peak * devices, f"{devices} x {what}"
    return {"per_step": step, "per_image": step / cfg.batch_size if step else None,
            "batch_size": cfg.batch_size, "counted": counted, "peak_tflops": peak,
            "peak": what}


def lock(folder: str, busy: str) -> int:
    """An exclusive lock on the folder for as long as this process lives (or the descriptor
    returned stays open); UsageError(busy) when another process holds it."""
    fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(busy) from None
    return fd


def _missing_top(path: str):
    """The highest folder on the way to path that does not exist yet (None if path exists)."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    return top


def _get_rng() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _memory_figures(device: torch.device) -> str:
    mib = 1 << 20
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (f"allocator peak {torch.cuda.max_memory_allocated(device) / mib:.0f} MiB of "
                f"{total / mib:.0f} MiB on {torch.cuda.get_device_name(device)}")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"process peak RSS {peak / mib:.0f} MiB of {total / mib:.0f} MiB RAM"


def _open_stopped_run(run_dir: str, cfg, impl: str, env: dict,
                      model: Optional[dict] = None) -> tuple[RunResult, dict, dict]:
    """The record and checkpoint of the stopped run in run_dir, checked (common/resume.py);
    and the record as it was on disk."""
    where = f"--resume {run_dir}"
    stored = resume.read_stopped(run_dir, impl)
    given = cfg.to_dict()
    info = stored.get("checkpoint")
    ckpt, state = resume.read_checkpoint(run_dir, info["file"], impl, where) if info \
        else (None, {})
    resume.check(where, stored, given, impl, env, ckpt, model)
    known = {f.name for f in fields(RunResult)}
    result = RunResult(**{k: v for k, v in stored.items() if k in known})
    result.status, result.error, result.config = "running", None, given
    result.run_id = os.path.basename(run_dir)  # where the run is now, if it was moved
    result.epochs = list(state["ampcompare"]["epochs"])
    result.step_losses = list(state["ampcompare"]["step_losses"])
    result.unsaved_epoch = None  # the resume redoes it
    # Summarised with the env the record keeps, as every later epoch is (end_epoch).
    result.summary = summarize(result.epochs, result.env)
    result.weights_sha256, result.weights_epochs = info["weights_sha256"], info["epochs"]
    result.resumes = [*stored.get("resumes", []), {"epoch": info["epochs"], "env": env}]
    return result, state, stored
