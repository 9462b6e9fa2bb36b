"""May this stopped run be resumed, and from what? `check` decides from values alone (the stored
record, what the checkpoint file holds, the options and the machine of the new process); the
functions around it only read the folder. Record, checkpoint and weights are checked against
each other, so that a hand-edited record (another lr, a checkpoint hash fixed up after a byte
of the file changed) is refused rather than continued under a name that is not true.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from common import config as config_module
from record import checkpoints, results
from common.config import option_flag, spelled
from common.errors import UsageError
from record.summary import summarize


def may_change() -> tuple:
    """The options that may differ when a run is resumed (config.py declares which): none of
    them changes what is computed; --epochs may be raised; --out-dir, --run-id and --resume
    come from the folder being resumed."""
    c = config_module
    return c.names(resume=(c.FREE, c.FOLDER, c.RAISED))


# A resumed run must run on what the stopped one ran on, or its epochs would mix two machines:
# the same device and torch, and the framework the arm uses.
_SAME = ("device", "device_name", "torch", "world_size")
SAME_ENV = {
    "plain": _SAME,
    "lightning": (*_SAME, "lightning"),
    "fabric": (*_SAME, "lightning"),
    "accelerate": (*_SAME, "accelerate"),
    "apex": (*_SAME, "apex"),
}
# Where each arm's checkpoint keeps the common model's weights, and the prefix of their keys.
MODEL_STATE = {
    "plain": ("model", ""),
    "apex": ("model", ""),
    "fabric": ("model", ""),
    "accelerate": ("model", ""),
    "lightning": ("state_dict", "model."),
}


@dataclass
class Checkpoint:
    """What the checkpoint file holds, as far as the check needs it."""

    sha256: str  # of the file
    epochs: int  # rows of measurements in it
    config: Optional[dict]  # the options it was trained with (None: written before they were)
    weights_sha256: Optional[str]  # the hash it was saved with
    model_sha256: Optional[str]  # the hash of the weights really in it
    unreadable: Optional[str] = None  # why it could not be read as one of ours


def read_stopped(run_dir: str, impl: str) -> tuple[results.RunResult, dict]:
    """The record in run_dir, checked to be one that `ampcompare <impl> --resume` continues,
    and the JSON as it is on disk (put back where a resume is refused)."""
    where = f"--resume {run_dir}"
    if not os.path.isdir(run_dir):
        raise UsageError(f"{where}: no such folder")
    try:
        on_disk = results.read_json(run_dir)
    except OSError as e:
        raise UsageError(f"{where}: cannot read its result.json ({e.strerror})") from None
    except results.NotARecord:
        raise UsageError(f"{where}: its result.json is not valid JSON") from None
    why = results.why_not_a_record(on_disk, complete=True)
    if why:
        raise UsageError(f"{where}: result.json is not a run record ({why})")
    stored = results.RunResult.from_dict(on_disk)
    if stored.impl != impl:
        raise UsageError(
            f"{where} is a {stored.impl} run; continue it with ampcompare "
            f"{stored.impl} --resume"
        )
    return stored, on_disk


def check(
    where: str,
    stored: results.RunResult,
    given: dict,
    impl: str,
    env: dict,
    ckpt: Optional[Checkpoint],
    model: Optional[dict] = None,
) -> None:
    """Raise UsageError (the one line) when the stopped run `stored` may not be continued with
    the options `given` on a machine with `env`, from checkpoint `ckpt` (None: none found),
    with the model `model` (model_spec.check's, as the record keeps it)."""
    _check_run(where, stored, given, impl, env, model)
    _check_epochs(where, stored, given)
    _check_checkpoint(where, stored, ckpt)


def check_options(where: str, config: dict, given: dict) -> None:
    """UsageError where an option that may not change (may_change) has in `given` another
    value than in the stopped run's `config`."""
    free = may_change()
    for name, value in given.items():
        if name not in free and config.get(name, value) != value:
            raise UsageError(
                f"{where}: {spelled(name, value)} differs from the stopped run's "
                f"{spelled(name, config[name])}; drop it to continue that run as it was"
            )


def _check_run(where, stored, given, impl, env, model) -> None:
    """The run itself: not diverged, the same options, machine and model source."""
    status, config = stored.status, stored.config
    if status == "diverged":
        raise UsageError(
            f"{where}: that run diverged ({stored.error}); resuming it "
            f"would replay the same steps"
        )
    check_options(where, config, given)
    for key in SAME_ENV.get(impl, _SAME):
        if key in stored.env and stored.env[key] != env.get(key):
            raise UsageError(
                f"{where}: that run ran with {key} {stored.env.get(key)}, this "
                f"machine has {env.get(key)}; one record cannot mix the two"
            )
    was, now = (
        (stored.model or {}).get("source_sha256"),
        (model or {}).get("source_sha256"),
    )
    if was and was != now:
        raise UsageError(
            f"{where}: the source of --model {config.get('model')} changed since "
            f"that run began (SHA-256 {was[:12]}..., now "
            f"{(now or 'none')[:12]}...); one record cannot mix two models"
        )


def _check_epochs(where, stored, given) -> None:
    """A checkpoint to continue from, and --epochs a resume may give."""
    status, config, info = stored.status, stored.config, stored.checkpoint
    if not info:
        raise UsageError(
            f"{where}: that run has no checkpoint (it ran with --no-checkpoint "
            f"or stopped before its first epoch ended); start it anew"
        )
    done, started = info["epochs"], config["epochs"]
    if given["epochs"] < started:
        raise UsageError(
            f"{where}: that run was started with --epochs {started}; --epochs may "
            f"only be raised"
        )
    if given["epochs"] <= done and status == "ok":
        raise UsageError(
            f"{where}: that run has {done} epochs done; pass --epochs above "
            f"{done} to train further"
        )
    if given["schedule"] == "cosine" and given["epochs"] != started:
        raise UsageError(
            f"{where}: --epochs changes the length of its cosine schedule; a "
            f"resumed cosine run keeps --epochs {started}"
        )


def _check_checkpoint(where, stored, ckpt) -> None:
    """The checkpoint file against the record: its hash, epochs, config and weights."""
    config, info, free = stored.config, stored.checkpoint, may_change()
    done, file = info["epochs"], info["file"]
    if ckpt is None:
        raise UsageError(f"{where}: {file}, which result.json names, is not there")
    if ckpt.sha256 != info["sha256"]:
        raise UsageError(
            f"{where}: {file} does not match the SHA-256 result.json recorded for "
            f"it (truncated or changed); nothing was overwritten"
        )
    if ckpt.unreadable:
        raise UsageError(
            f"{where}: {file} is not a checkpoint of this tool ({ckpt.unreadable})"
        )
    if ckpt.epochs != done:
        raise UsageError(f"{where}: {file} holds {ckpt.epochs} epochs, result.json says {done}")
    if ckpt.config is not None:
        for name, value in ckpt.config.items():
            if name not in free and config.get(name) != value:
                raise UsageError(
                    f"{where}: result.json says {option_flag(name)} "
                    f"{config.get(name)}, but {file} was trained with {value}; "
                    f"the record was changed, so the run is not continued"
                )
    hashes = {
        info["weights_sha256"],
        ckpt.model_sha256,
        *([ckpt.weights_sha256] if ckpt.weights_sha256 else []),
    }
    if len(hashes) != 1:
        raise UsageError(
            f"{where}: the weights in {file} are not the ones result.json (and the "
            f"checkpoint) recorded; the file was changed, so the run is not "
            f"continued"
        )


def open_stopped(run_dir: str, cfg, impl: str, env: dict, model: Optional[dict] = None):
    """(the run's record to go on with, the checkpoint's state, the record as it was on disk):
    the stopped run in run_dir, read and checked (check()), or UsageError."""
    where = f"--resume {run_dir}"
    stored, on_disk = read_stopped(run_dir, impl)
    given = cfg.to_dict()
    info = stored.checkpoint
    ckpt, state = read_checkpoint(run_dir, info["file"], impl, where) if info else (None, {})
    check(where, stored, given, impl, env, ckpt, model)
    result = dataclasses.replace(stored)
    result.status, result.error, result.config = "running", None, given
    result.run_id = os.path.basename(run_dir)  # where the run is now, if it was moved
    result.epochs = list(state["ampcompare"]["epochs"])
    result.step_losses = list(state["ampcompare"]["step_losses"])
    result.unsaved_epoch = None  # the resume redoes it
    # Summarised with the env the record keeps, as every later epoch is (end_epoch).
    result.summary = summarize(result.epochs, result.env)
    result.weights_sha256, result.weights_epochs = info["weights_sha256"], info["epochs"]
    result.resumes = [*stored.resumes, {"epoch": info["epochs"], "env": env}]
    return result, state, on_disk


def read_checkpoint(
    run_dir: str, file: str, impl: str, where: str
) -> tuple[Optional[Checkpoint], dict]:
    """Hash and load the named checkpoint (weights only): what check() weighs (None: no such
    file), and the whole loaded state for the arm."""
    path = os.path.join(run_dir, file)
    try:
        digest = checkpoints.synced_sha256(path)
    except FileNotFoundError:
        return None, {}
    except OSError as e:
        raise UsageError(f"{where}: cannot read {file} ({e.strerror})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ours = state["ampcompare"]
        epochs = len(ours["epochs"])
        key, prefix = MODEL_STATE[impl]
        model = model_sha256(state[key], prefix)
    except Exception as e:  # not one of ours; check() says so once the hash matches
        return Checkpoint(digest, -1, None, None, None, type(e).__name__), {}
    return Checkpoint(
        digest, epochs, ours.get("config"), ours.get("weights_sha256"), model
    ), state


def model_sha256(state: dict, prefix: str = "") -> str:
    """weights_sha256 of the common model whose weights a checkpoint holds under `prefix`
    (Lightning's "model."), whatever wrapper (torch.compile's "_orig_mod.") saved them."""
    own = {
        k[len(prefix) :].replace("_orig_mod.", ""): v
        for k, v in state.items()
        if k.startswith(prefix)
    }
    return results.state_sha256(own)
