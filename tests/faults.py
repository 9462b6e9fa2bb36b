"""One way to make a run fail on purpose: in this process (monkeypatch), or in the child
processes that compare starts (an environment variable read by
tests/fault_hook/sitecustomize.py).

A fault fires in epoch `epoch` — after step `step` of that epoch, or with step=None when its
training part ends, with step="save" halfway through writing that epoch's checkpoint, with
step="between" once that checkpoint has its name but before the record that names it does,
with step="committed" once that record is in place but before the old checkpoint is removed,
with step="recorded" once that epoch's record and checkpoint are on disk, with step="start"
as the run is about to write its first record, or with step="ended" once it has written its
last (both: any epoch) — in a
process whose command line holds every word of `argv` (and, given `rank`, only in that rank of
a job of several processes). It does:
    "raise"      raise RuntimeError("broken on purpose")
    "interrupt"  raise KeyboardInterrupt, as Ctrl-C does
    "exit"       os._exit(137): gone with no chance to record anything, as after SIGKILL
    "kill"       send SIGKILL to itself
    "sigint-parent3" send SIGINT to its parent three times: Ctrl-C to a compare, impatiently
    "sigterm"    send SIGTERM to itself, as a scheduler or `timeout` does
    "sigint2"    send SIGINT to itself twice, 20 ms apart: an impatient Ctrl-C
    "stop"       send SIGSTOP to itself: a hung process
    "enospc"     raise OSError(ENOSPC), as a full disk does
    "usage"      raise UsageError("refused on purpose"): a refusal found while running
    "unavailable" raise Unavailable("unavailable on purpose"), as a missing framework does
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time

ENV = "AMPCOMPARE_TEST_FAULT"
HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_hook")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def act(action: str) -> None:
    if action == "raise":
        raise RuntimeError("broken on purpose")
    if action == "interrupt":
        raise KeyboardInterrupt
    if action == "exit":
        os._exit(137)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        return
    if action == "sigint-parent3":
        for _ in range(3):
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(0.01)
        return
    if action in ("sigterm", "stop"):
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGSTOP)
        return
    if action == "sigint2":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the signals arrive while this process is writing
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action in ("usage", "unavailable"):
        from common.errors import Unavailable, UsageError

        raise (
            UsageError("refused on purpose")
            if action == "usage"
            else Unavailable("unavailable on purpose")
        )
    raise ValueError(f"unknown fault action {action!r}")


def install(setattr, epoch: int, action: str, step=None, argv=(), rank=None) -> None:
    """Patch the common EpochMeter (every arm measures through it) with `setattr`."""
    if not all(word in sys.argv for word in argv):
        return
    if rank is not None and os.environ.get("RANK") != str(rank):
        return
    saves = []  # the fault fires once, whichever patch meets it first
    _patch_training(setattr, epoch, action, step, saves)
    _patch_recording(setattr, epoch, action, step, saves)


def _patch_training(setattr, epoch: int, action: str, step, saves: list) -> None:
    """The meter's steps and the end of training, and torch.save of a checkpoint."""
    import torch
    from common import metrics

    meter = metrics.EpochMeter
    real_step, real_done, real_save = meter.step, meter.train_done, torch.save

    def save(obj, f, *args, **kwargs):  # every arm writes its checkpoint with torch.save
        ours = isinstance(obj, dict) and "ampcompare" in obj
        if step == "save" and ours and len(obj["ampcompare"]["epochs"]) == epoch + 1:
            saves.append(1)
            if len(saves) == 1:
                if isinstance(f, (str, os.PathLike)):
                    with open(f, "wb") as half:  # half a file, as a write cut short leaves it
                        half.write(b"PK\x03\x04" + b"\0" * 1000)
                act(action)
        return real_save(obj, f, *args, **kwargs)

    def step_(self, loss, images):
        real_step(self, loss, images)
        if isinstance(step, int) and self.epoch == epoch and len(self.losses) == step:
            act(action)

    def train_done(self):
        if step is None and self.epoch == epoch:
            act(action)
        real_done(self)

    setattr(meter, "step", step_)
    setattr(meter, "train_done", train_done)
    setattr(torch, "save", save)


def _patch_recording(setattr, epoch: int, action: str, step, saves: list) -> None:
    """The run's start, its end, each epoch's record and the renames that commit it."""
    from record import recorder, rundir

    real_end, real_reserve = recorder.Recorder.end_epoch, rundir.reserve

    def reserve(run_dir, size):  # first called as the run starts, before its first record
        if step == "start" and not saves:
            saves.append(1)
            act(action)
        real_reserve(run_dir, size)

    setattr(rundir, "reserve", reserve)
    real_exit = recorder.Recorder.__exit__

    def exit_(self, *exc):
        swallowed = real_exit(self, *exc)
        if step == "ended":
            act(action)
        return swallowed

    setattr(recorder.Recorder, "__exit__", exit_)

    def end_epoch(self, row, *args, **kwargs):
        real_end(self, row, *args, **kwargs)
        if step == "recorded" and row["epoch"] == epoch:
            act(action)

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # the renames that commit a checkpoint and record
        real_replace(src, dst, *args, **kwargs)
        folder, name = os.path.split(os.fspath(dst))
        new = f"checkpoint-{epoch + 1}.pt"
        if step == "between" and name == new:
            act(action)
        if (
            step == "committed"
            and name == "result.json"
            and os.path.exists(os.path.join(folder, new))
            and os.path.exists(os.path.join(folder, f"checkpoint-{epoch}.pt"))
        ):
            act(action)

    setattr(os, "replace", replace)
    setattr(recorder.Recorder, "end_epoch", end_epoch)


def inject(monkeypatch, epoch: int, action: str, step=None) -> None:
    """A fault in this process."""
    install(monkeypatch.setattr, epoch, action, step)


def inject_children(monkeypatch, epoch: int, action: str, step=None, argv=(), rank=None):
    """A fault in every child process started from now on whose argv holds all of `argv`."""
    monkeypatch.setenv(
        ENV,
        json.dumps(
            {"epoch": epoch, "action": action, "step": step, "argv": list(argv), "rank": rank}
        ),
    )
    _hook_children(monkeypatch)


def _hook_children(monkeypatch) -> None:
    """tests/fault_hook/sitecustomize.py loaded by every child process started from now on."""
    path = [HOOK, ROOT, os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))


def install_from_env() -> None:
    spec = json.loads(os.environ[ENV])
    install(setattr, spec["epoch"], spec["action"], spec["step"], spec["argv"], spec["rank"])


SHARDS_ON_CPU = "AMPCOMPARE_TEST_ACCELERATE_FSDP_ON_CPU"


def accelerate_shards_on_cpu() -> None:
    """Accelerate as if it turned FSDP on for a job of CPU processes, as it does for GPUs:
    only that decision changes (its state's distributed type made FSDP where a plugin was
    given, and the arm's refusal of a CPU lifted, its other refusals kept); what Accelerate
    then does with FSDP2 (its wrapping, its prepare, its scaler) is its own. So that the
    accelerate arm's FSDP code, GPU-only in use, is proven here against the plain loop."""
    import torch
    from accelerate import state
    from accelerate.utils import DistributedType

    from accelerate_impl import precision

    real_init = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        real_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":  # what Accelerate does on a GPU, as it is
                fsdp_plugin.set_mixed_precision(self._mixed_precision)

    state.AcceleratorState.__init__ = init
    real_refuse = precision.refuse_sharding

    def refuse_sharding(cfg, device):
        real_refuse(cfg, torch.device("meta") if device.type == "cpu" else device)

    precision.refuse_sharding = refuse_sharding


def shard_accelerate_on_cpu(monkeypatch) -> None:
    """accelerate_shards_on_cpu in every child process started from now on."""
    monkeypatch.setenv(SHARDS_ON_CPU, "1")
    _hook_children(monkeypatch)
