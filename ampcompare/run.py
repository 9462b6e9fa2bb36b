"""Running one arm from the command line: in this process, or as the N processes of a
`--devices N` job; its one summary line. The commands themselves are declared in cli.py."""

from __future__ import annotations

import importlib
import os

from ampcompare import quiet
from common import console, precision, ranks
from common.device import resolve_device
from common.config import Config
from common.errors import Unavailable, UsageError
from record import rundir, signals, summary
from record.results import RunResult

IMPLS = {
    "plain": "plain_torch.train",
    "lightning": "lightning_impl.train",
    "fabric": "fabric_impl.train",
    "accelerate": "accelerate_impl.train",
    "apex": "apex_impl.train",
}
OWN_PACKAGES = {"ampcompare", "common", "record", *(p.split(".")[0] for p in IMPLS.values())}


def run_one(impl: str, cfg: Config) -> int:
    """Run one implementation in this process (or, with --devices N, start the N processes of
    its DDP job); print where its result is. Returns the exit code."""
    from common import distributed

    if cfg.role == "control" and impl != "plain":
        raise UsageError(
            f"--role control: a comparison's control is the plain loop run once more; "
            f"{impl} runs as an arm (--role arm)"
        )
    if impl == "apex":  # say what apex lacks before its loop module is even imported
        from apex_impl.opt_levels import check

        check(cfg)
    if impl == "accelerate":  # what it would really run, said first
        from accelerate_impl import precision as accelerate_precision

        accelerate_precision.refuse_sharding(cfg, resolve_device(cfg))
        if not ranks.launched():
            accelerate_precision.check(cfg)
    cfg.validate()
    if impl in ("lightning", "fabric") and cfg.strategy == "fsdp":  # said before it starts
        precision.refuse_unless_model_parallel_runs(impl, cfg.precision, resolve_device(cfg))
    if cfg.devices * cfg.num_nodes > 1 and not distributed.launched():
        return launch_job(impl, cfg)
    try:
        module = importlib.import_module(IMPLS[impl])
    except ImportError as e:
        # A framework missing or broken here: unavailable. This project's own modules failing
        # to import is a bug, never a reason to call an arm unavailable: it propagates.
        if not e.name or e.name.split(".")[0] in OWN_PACKAGES:
            raise
        raise Unavailable(f"{impl}: cannot import its framework ({e})") from None
    quiet.frameworks()  # again: Lightning sets its loggers' level as it is imported
    try:
        result = module.train(cfg)
    except SystemExit as end:  # the model's or a framework's sys.exit, inside the loop
        if signals.received():
            raise
        if ranks.speaks():  # one line a node
            console.say(
                f"ampcompare: error{ranks.who()}: {impl}: sys.exit({end.code!r}) was called "
                f"during the run (by the model or a framework); its record says failed",
                err=True,
            )
        return 1
    finally:
        distributed.shutdown()
    # One job, one summary: rank 0's, or, under `--devices N`, the launcher's (it knows how
    # every rank ended).
    if ranks.is_rank0() and not ranks.under_our_launcher():
        summary_line(impl, result, cfg)
    return signals.interrupted_exit() if result.status == "interrupted" else result.exit_code


def summary_line(impl: str, record: RunResult, cfg: Config) -> None:
    from ampcompare import stats

    acc = record.summary.get("final_test_acc")
    acc = f"{acc:.4f}" if acc is not None else "-"
    sample = stats.Sample([summary.timed_steps(record.epochs)[0]], record.run_id)
    est = stats.level(sample) if sample else None
    step = stats.duration_with_interval(est) if est else "-"
    console.say(
        f"{impl} {record.precision.effective}: {record.status}, "
        f"test acc {acc}, median step {step}"
    )
    if record.error:
        console.say(f"error: {record.error}", err=True)
    console.say(f"result: {os.path.join(cfg.out_dir, record.run_id, 'result.json')}")


def launch_job(impl: str, cfg: Config) -> int:
    """The N processes of a DDP job on this node, everything about them fixed first."""
    from ampcompare import compare, launch
    from common import data, precision
    from record import results
    from common.device import resolve_device

    if cfg.num_nodes > 1:
        raise UsageError(
            f"--num-nodes {cfg.num_nodes}: start the job on each node with torchrun "
            f"--nnodes {cfg.num_nodes} --nproc-per-node {cfg.devices} --rdzv-backend c10d "
            f"--rdzv-endpoint HOST:PORT -m ampcompare {impl} --devices {cfg.devices} "
            f"--num-nodes {cfg.num_nodes} ... (docs/devices.md)"
        )
    try:
        ranks.threads()  # each rank would fail on it
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = resolve_device(cfg)  # --devices against the GPUs there are
    data.load(cfg)  # a missing CIFAR-10 is one line here, not one per rank
    if cfg.resume:
        if rundir.held(cfg.resume):  # refused here, before any rank could touch the record
            raise UsageError(f"{cfg.resume}: {rundir.BUSY}")
        args = [
            impl,
            "--resume",
            cfg.resume,
            *compare.child_args(cfg, exclude=("resume", "out_dir", "run_id")),
        ]
    else:
        rundir.check_out_dir(cfg.out_dir)
        named = precision.mixed_default(device) if cfg.precision == "auto" else cfg.precision
        cfg.run_id = cfg.run_id or results.new_run_id(impl, named)
        if os.path.exists(os.path.join(cfg.out_dir, cfg.run_id)):
            raise UsageError(
                f"{os.path.join(cfg.out_dir, cfg.run_id)} already exists; choose "
                f"another --run-id"
            )
        args = [impl, *compare.child_args(cfg, exclude=("resume",))]
    code = launch.run(cfg, args)
    try:  # the job's one summary line, from its record as the launcher settled it
        record = results.RunResult.read(os.path.join(cfg.out_dir, cfg.run_id))
        if code not in launch.REFUSED:
            summary_line(impl, record, cfg)
    except (OSError, results.NotARecord):
        pass
    return code
