"""The life of one run's record: begun (new, or resumed), an epoch at a time, and ended with a
status that is true.

As a context manager the Recorder turns the way a loop ended (normally, Ctrl-C, SIGTERM or
SIGHUP, out of memory, divergence, a full disk, any error) into the recorded status
(record/endings.py). A status is final only once everything it names is on disk: `ok` is
written after the last epoch's checkpoint and weights hash. At the end of every epoch the
checkpoint and result.json are written as a pair that a crash at any instant leaves whole
(record/checkpoints.py); an epoch's row joins the record's epochs only with its checkpoint.
The folder, its lock and its reserve are record/rundir.py's; whether and how a stopped run
continues, record/resume.py's.
"""

from __future__ import annotations

import errno
import os
import shutil
import traceback
from typing import Callable, Optional

import torch

from common import distributed, metrics, sharding
from record import checkpoints, endings, resume, rundir, signals
from common.errors import UsageError
from record.files import write_json, write_temp
from record.results import SCHEMA, Precision, RunResult, new_run_id, weights_sha256
from record.summary import summarize


class Recorder:
    """Owns the run folder and result.json of one run, new or resumed. With several processes
    every rank has one; rank 0's alone writes."""

    def __init__(
        self,
        cfg,
        impl: str,
        policy,
        device: torch.device,
        env: dict,
        opt_level: Optional[str] = None,
        world: Optional[distributed.World] = None,
        model: Optional[dict] = None,
    ):
        world = world or distributed.World()  # None: a single process
        self.cfg, self.device, self.world = cfg, device, world
        self.is_rank0 = world.is_rank0
        self.lock = None
        env = {**env, **world.to_dict()}
        if world.size > 1:
            env["pids"] = distributed.gather_ints(os.getpid(), self.device)
        self.resumed: Optional[dict] = None  # the checkpoint a resumed run continues from
        self.checkpoint_path: Optional[str] = None  # and its file
        if cfg.resume:
            self.run_dir = os.path.abspath(cfg.resume)
            if self.is_rank0:  # one process continues a run, never two
                self.lock = rundir.lock(self.run_dir, f"{self.run_dir}: {rundir.BUSY}")
            try:  # record_on_disk: put back if the resume is refused while building
                self.result, self.resumed, self.record_on_disk = resume.open_stopped(
                    self.run_dir, cfg, impl, env, model
                )
            except BaseException:
                self.unlock()
                raise
            self.checkpoint_path = os.path.join(self.run_dir, self.result.checkpoint["file"])
        else:
            run_id = cfg.run_id or new_run_id(impl, policy.effective)
            self.run_dir = os.path.join(cfg.out_dir, run_id)
            self.result = RunResult(
                schema=SCHEMA,
                run_id=run_id,
                impl=impl,
                repeat=cfg.repeat,
                seed=cfg.seed,
                status="running",
                error=None,
                precision=Precision(policy.requested, policy.effective),
                opt_level=opt_level,
                config=cfg.to_dict(),
                env=env,
            )
        self.result.pid, self.result.model = os.getpid(), model
        self.path = os.path.join(self.run_dir, "result.json")
        self.next_is_warmup = True  # no epoch has ended in this process yet
        self.saving = None  # the hash of the weights being saved, for state()
        self.pending, self.pending_losses = [], []  # the epoch whose checkpoint is being saved

    @property
    def start_epoch(self) -> int:
        return len(self.result.epochs)

    def __enter__(self) -> "Recorder":
        try:
            with signals.deferred():
                if self.resumed:
                    _set_rng(self.resumed["ampcompare"]["rng"])
                if self.is_rank0:
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
                checkpoints.clean(self.run_dir, self.record_on_disk)
            else:
                made = rundir.make(self.run_dir)
                self.lock = rundir.lock(self.run_dir, f"{self.run_dir}: {rundir.BUSY}")
            rundir.reserve(self.run_dir, 1 << 20)
            self.write()
        except FileExistsError:
            raise UsageError(
                f"{self.run_dir} already exists; choose another --run-id, or "
                f"continue it with --resume {self.run_dir}"
            ) from None
        except OSError as e:
            self.unlock()
            if made:
                shutil.rmtree(made, ignore_errors=True)  # only the folders made just now
            raise UsageError(f"cannot start a run in {self.run_dir}: {e.strerror}") from None

    def state(self) -> dict:
        """The measurements so far, the options and the hash of the weights being saved, for
        the checkpoint: what a resumed run continues from, and checks the record against."""
        return {
            "ampcompare": {
                "schema": SCHEMA,
                "epochs": self.result.epochs + self.pending,
                "step_losses": self.result.step_losses + self.pending_losses,
                "rng": _get_rng(),
                "config": self.cfg.to_dict(),
                "weights_sha256": self.saving,
            }
        }

    def end_epoch(
        self,
        row: dict,
        losses: list,
        model: torch.nn.Module,
        save: Optional[Callable[[str], None]] = None,
        save_is_collective: bool = False,
    ) -> None:
        """Record a finished epoch: its row and step losses, the hash of the weights and (unless
        --no-checkpoint) the checkpoint that `save(path)` writes, which must hold state(). The
        row joins the record's epochs together with its checkpoint; interrupted before that,
        it is kept as `unsaved_epoch` (a resume redoes it). Raises Diverged after the row is
        recorded; the last good checkpoint stays. With several processes every rank calls this
        and rank 0 writes; save_is_collective: a framework whose save every rank must call
        (it writes on rank 0 only)."""
        row["warmup"], self.next_is_warmup = self.next_is_warmup, False
        reason = metrics.divergence(row, losses)  # the same on every rank: the row is the job's
        checkpointing = self.cfg.checkpoint and save is not None and not reason
        if not checkpointing:
            self._add(row, losses)
            if reason:
                raise metrics.Diverged(reason)
        # The weights' hash; a sharded model's full weights are gathered by every rank.
        weights = weights_sha256(model) if self.is_rank0 or sharding.is_sharded(model) else None
        if not self.is_rank0:
            if checkpointing:
                if save_is_collective:
                    save(os.devnull)  # the framework writes nothing here, and waits for rank 0
                self._add(row, losses)
        else:
            self._write_epoch(row, losses, weights, save if checkpointing else None)
        if len(self.result.epochs) >= self.cfg.epochs:
            signals.absorb_from_now()  # the last epoch is on disk: nothing is left to interrupt

    def _write_epoch(self, row: dict, losses: list, weights: str, save) -> None:
        """Rank 0: the epoch's checkpoint (with save) and the record that names it, as a
        pair. weights: their hash (with several ranks, rank 0's: BatchNorm's running
        statistics are each rank's)."""
        info, staged = self.result.checkpoint, None
        old = checkpoints.file_named_in(self.result.to_dict())
        try:
            if save is not None:
                self.pending, self.pending_losses, self.saving = [row], list(losses), weights
                staged = write_temp(os.path.join(self.run_dir, "x.pt"), lambda f: None)
                self._save(save, staged)
                done = len(self.result.epochs) + 1
                info = {
                    "file": checkpoints.file_for(done),
                    "epochs": done,
                    "sha256": checkpoints.synced_sha256(staged),
                    "weights_sha256": weights,
                }
            epochs = self.result.epochs + self.pending
            record = {
                **self.result.to_dict(),
                "epochs": epochs,
                "step_losses": self.result.step_losses + self.pending_losses,
                "summary": summarize(epochs, self.result.env),
                "weights_sha256": weights,
                "checkpoint": info,
                "weights_epochs": len(epochs),
                "unsaved_epoch": None,
            }
            checkpoints.commit(self.run_dir, record, staged, info and info["file"])
            staged = None
            if self.pending:
                self._add(*self._take_pending())
            self.result.weights_sha256, self.result.checkpoint = weights, info
            self.result.weights_epochs, self.result.unsaved_epoch = (
                len(self.result.epochs),
                None,
            )
            if old and info and old != info["file"]:
                rundir.remove(os.path.join(self.run_dir, old))
            rundir.reserve(self.run_dir, 4 * os.path.getsize(self.path) + (64 << 10))
        finally:
            if staged is not None:
                rundir.remove(staged)
            if self.pending:  # not committed: measured, but no checkpoint holds it
                self.result.unsaved_epoch = self._take_pending()[0]
            self.saving = None

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
            if self.is_rank0:
                if self.resumed:
                    write_json(self.path, self.record_on_disk)
                else:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
            self.unlock()
            return False
        signals.absorb_from_now()  # the run has ended: a signal now would only cut this short
        memory = (
            endings.memory_figures(self.device)
            if kind is not None and endings.out_of_memory(kind, exc)
            else ""
        )
        self.result.status, self.result.error = endings.ending(
            kind,
            exc,
            signals.received() > 0,
            self.cfg.batch_size,
            memory,
            saved=self.result.checkpoint is not None,
        )
        if self.world.size > 1:
            distributed.mark_ending(
                self.run_dir,
                self.world.rank,
                self.result.status,
                self.result.error,
                signals.first(),
            )
        if self.is_rank0:
            self._write_end(kind, exc, tb)
        # Exceptions are the run's status now; SystemExit and the like still propagate.
        return kind is None or issubclass(kind, (Exception, KeyboardInterrupt))

    def _write_end(self, kind, exc, tb) -> None:
        """Rank 0: the record's last write, into the room the reserve kept for it."""
        rundir.remove(os.path.join(self.run_dir, rundir.RESERVE))
        drop = (
            checkpoints.file_named_in(self.result.to_dict())
            if self.result.status == "ok" and not self.cfg.keep_checkpoint
            else None
        )
        if drop:  # the record stops naming the file before the file goes
            self.result.checkpoint = None
        try:
            if self.result.status in ("failed", "oom"):
                with open(os.path.join(self.run_dir, "error.log"), "w", encoding="utf-8") as f:
                    f.write("".join(traceback.format_exception(kind, exc, tb)))
            self.write()
            if drop:
                rundir.remove(os.path.join(self.run_dir, drop))
        except OSError as e:
            self.result.error = (
                f"{self.result.error or ''}; and the record could not be updated: {e.strerror}"
            ).lstrip("; ")
            if self.result.status == "ok":
                self.result.status = "failed"
        self.unlock()

    def unlock(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def _save(self, save: Callable[[str], None], path: str) -> None:
        try:
            save(path)
        except Exception as e:
            # torch.save's zip writer reports a full disk as a RuntimeError ("unexpected pos").
            stat = os.statvfs(self.run_dir)
            if stat.f_bavail * stat.f_frsize < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the checkpoint") from e
            raise

    def write(self) -> None:
        write_json(self.path, self.result.to_dict())


def _get_rng() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
