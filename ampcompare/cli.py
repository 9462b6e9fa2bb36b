"""The ampcompare command line. Each command imports its implementation only when it runs:
`ampcompare plain` never imports Lightning or apex, and a missing apex breaks nothing else."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from typing import Optional

import click
from click.core import ParameterSource

from ampcompare import plan, quiet
from common import console, ranks
from record import rundir, signals, summary
from common.config import Config, option_flag
from common.errors import Unavailable, UsageError, unavailable_exit
from record.resume import read_stopped

IMPLS = {
    "plain": "plain_torch.train",
    "lightning": "lightning_impl.train",
    "fabric": "fabric_impl.train",
    "accelerate": "accelerate_impl.train",
    "apex": "apex_impl.train",
}
OWN_PACKAGES = {"ampcompare", "common", "record", *(p.split(".")[0] for p in IMPLS.values())}
NO_ARGS = click.exceptions.NoArgsIsHelpError  # what a bare `ampcompare` raises


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def option(name: str, **override):
    """The click option of one Config field: its flag, type, default and help come from it
    (`default=` another default, for a command whose own differs: the bench's)."""
    fld = FIELDS[name]
    spec, default = fld.metadata["click"], override.get("default", fld.default)
    shown = spec.get("shown", default if default is not None else "none")
    if isinstance(default, bool):
        shown = spec["flag"].split("/")[0 if default else 1]
    kwargs = {
        "default": default,
        "help": f"{fld.metadata['help']}  [default: {shown}]",
        "show_default": False,
    }
    if "choices" in spec:
        kwargs["type"] = click.Choice(spec["choices"])
    elif "type" in spec or default not in (None, True, False):  # flags: click infers them
        kwargs["type"] = spec.get("type", type(default))
    decls = [spec.get("flag", option_flag(name))]
    return click.option(*decls, name, **kwargs)


def common_options(command=None, *, exclude=()):
    """The COMMON option bundle: one click option per Config field, default and help from it."""
    if command is None:
        return functools.partial(common_options, exclude=exclude)
    for name, fld in reversed(FIELDS.items()):
        if fld.metadata["common"] and name not in exclude:
            command = option(name)(command)
    return command


def config_from(options: dict, stored: Optional[dict] = None, ctx=None) -> Config:
    """The Config of a command's options. With --resume, `stored` is the stopped run's (or
    comparison's) config: every option not given on the command line comes from it."""
    values = {k: v for k, v in options.items() if k in FIELDS}
    if stored is None:
        return Config(**values)
    given = {k for k in values if _given(ctx, k)}
    for name in ("out_dir", "run_id"):
        if name in given:
            raise UsageError(f"--resume names the folder to continue; drop {option_flag(name)}")
    merged = {k: v for k, v in stored.items() if k in FIELDS}
    merged.update({k: values[k] for k in given}, resume=values["resume"])
    return Config(**merged)


def _say(line: str) -> None:
    """One line on stderr; in a job of several processes, rank 0's only."""
    if ranks.is_rank0():
        console.say(line, err=True)


class OneLineErrors(click.Group):
    """Usage and environment errors print one line and exit 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        console.setup()
        quiet.frameworks()
        stray = ranks.stray()
        if stray:
            _say(
                f"ampcompare: warning: {', '.join(f'{v}={os.environ[v]}' for v in stray)} "
                f"set without the rest of a launcher's variables; running as one process"
            )
        try:
            _clear_framework_env()
            code = super().main(
                args=args, prog_name=prog_name or "ampcompare", standalone_mode=False, **extra
            )
        except NO_ARGS as e:
            console.say(e.ctx.get_help())
            code = 0
        except click.ClickException as e:
            _say(f"ampcompare: error: {one_line(e.format_message())}")
            code = 2
        except UsageError as e:
            _say(f"ampcompare: error: {one_line(str(e))}")
            code = unavailable_exit() if isinstance(e, Unavailable) else 2
        except (KeyboardInterrupt, click.exceptions.Abort):
            _say("ampcompare: interrupted")
            code = signals.interrupted_exit()
        except BrokenPipeError:  # click's own output (--help) to a reader that has gone
            console.silence(sys.stdout)
            code = 0
        sys.exit(code or 0)


def _clear_framework_env() -> None:
    """Take out what Lightning and Accelerate would read from the environment (or refuse it:
    UsageError), said once, in the process the user started."""
    from record import framework_env
    from common.errors import COMPARE_CHILD

    child = bool(os.environ.get(COMPARE_CHILD)) or ranks.launched()
    found = framework_env.scrub(child=child)
    if found and not child:
        _say(framework_env.warning(found))


def one_line(text: str) -> str:
    """A message as one line, whatever a framework's or a model's error put in it."""
    return " ".join(text.split())


@click.group(cls=OneLineErrors, no_args_is_help=True)
@click.version_option(package_name="ampcompare")
def cli():
    """One CIFAR-10 training loop written five times (plain PyTorch, NVIDIA apex, PyTorch
    Lightning, Lightning Fabric, Hugging Face Accelerate) to compare mixed-precision speed,
    memory and accuracy side by side."""


def run_one(impl: str, cfg: Config) -> int:
    """Run one implementation in this process (or, with --devices N, start the N processes of
    its DDP job); print where its result is. Returns the exit code."""
    from common import distributed

    if impl == "apex":  # say what apex lacks before its loop module is even imported
        from apex_impl.opt_levels import check

        check(cfg)
    if impl == "accelerate" and not ranks.launched():  # what it would really run, said first
        from accelerate_impl.precision import check as check_accelerate

        check_accelerate(cfg)
    cfg.validate()
    if cfg.devices * cfg.num_nodes > 1 and not distributed.launched():
        return _launch(impl, cfg)
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
        _say(
            f"ampcompare: error: {impl}: sys.exit({end.code!r}) was called during the run (by "
            f"the model or a framework); its record says failed"
        )
        return 1
    finally:
        distributed.shutdown()
    # One job, one summary: rank 0's, or, under `--devices N`, the launcher's (it knows how
    # every rank ended).
    if ranks.is_rank0() and not ranks.under_our_launcher():
        _summary(impl, result.to_dict(), cfg)
    return signals.interrupted_exit() if result.status == "interrupted" else result.exit_code


def _summary(impl: str, record: dict, cfg: Config) -> None:
    from ampcompare import stats

    s = record.get("summary") or {}
    acc = f"{s['final_test_acc']:.4f}" if s.get("final_test_acc") is not None else "-"
    sample = stats.Sample(
        [summary.timed_steps(record.get("epochs") or [])[0]], record["run_id"]
    )
    est = stats.level(sample) if sample else None
    step = stats.duration_with_interval(est.value, est.lo, est.hi) if est else "-"
    console.say(
        f"{impl} {record['precision']['effective']}: {record['status']}, "
        f"test acc {acc}, median step {step}"
    )
    if record.get("error"):
        console.say(f"error: {record['error']}", err=True)
    console.say(f"result: {os.path.join(cfg.out_dir, record['run_id'], 'result.json')}")


def _launch(impl: str, cfg: Config) -> int:
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
        record = results.read(os.path.join(cfg.out_dir, cfg.run_id))
        if not results.why_not_a_record(record) and code not in launch.REFUSED:
            _summary(impl, record, cfg)
    except (OSError, ValueError):
        pass
    return code


def arm_config(impl: str, options: dict) -> Config:
    if not options.get("resume"):
        return config_from(options)
    stored = read_stopped(options["resume"], impl)["config"]
    cfg = config_from(options, stored, click.get_current_context())
    resume = os.path.abspath(cfg.resume)  # the run lives where it is now, wherever it began
    cfg.out_dir, cfg.run_id = os.path.dirname(resume), os.path.basename(resume)
    return cfg


def _impl_command(impl: str, doc: str):
    @cli.command(impl, help=doc)
    @common_options
    def command(**options):
        return run_one(impl, arm_config(impl, options))

    return command


plain = _impl_command("plain", "The hand-written loop: torch.autocast + torch.amp.GradScaler.")
lightning = _impl_command("lightning", "PyTorch Lightning: Trainer(precision=...).")
fabric = _impl_command(
    "fabric",
    "Lightning Fabric: Fabric(precision=...), fabric.setup, "
    "fabric.backward; the loop written by hand.",
)
accelerate = _impl_command(
    "accelerate",
    "Hugging Face Accelerate: Accelerator(mixed_precision="
    "...), accelerator.prepare, accelerator.backward; the loop written "
    "by hand.",
)


@cli.command(
    "apex",
    help="NVIDIA apex: amp.initialize + amp.scale_loss (needs CUDA and apex 25.04 or older).",
)
@common_options
@option("opt_level")
def apex(**options):
    return run_one("apex", arm_config("apex", options))


@cli.command(
    "bench",
    help="What each framework costs per step, and bf16-mixed against 32-true, "
    "measured side by side with a plain-against-plain control in each of several fresh "
    "processes and pooled over them, each figure with its 95% interval: a table, and "
    "bench.json in --out-dir.",
)
@click.option(
    "--processes",
    default=3,
    type=click.IntRange(min=1, max=100),
    help="Fresh processes, one after another; every figure's interval covers the spread "
    "between them (3 or more for a verdict).  [default: 3]",
)
@click.option(
    "--rounds",
    default=2,
    type=click.IntRange(min=1, max=1000),
    help="Timed rounds (epochs) of the small-CNN and loader measurements, in each "
    "process.  [default: 2]",
)
@click.option(
    "--linear-rounds",
    default=70,
    type=click.IntRange(min=1, max=100_000),
    help="Timed rounds of each framework's cost per step, with the linear model, in each "
    "process.  [default: 70]",
)
@option("synthetic_size", default=5120)
@option("batch_size")
@option("accelerator", default="cpu")
@option("out_dir", default="runs/bench")
@click.option(
    "--one-process",
    is_flag=True,
    hidden=True,
    help="Be one of the bench's processes: measure, and write rounds.json into --out-dir.  "
    "[default: off]",
)
def bench_command(processes, rounds, linear_rounds, one_process, **options):
    base = Config(
        dataset="synthetic", precision="32-true", quiet=True, checkpoint=False, **options
    ).validate()
    if one_process:  # one of the bench's processes: the arms take turns in it
        from ampcompare import bench_process

        return bench_process.run(rounds, linear_rounds, base)
    from ampcompare import bench

    return bench.run(processes, rounds, linear_rounds, base)


def _listed_choices(value: str, allowed, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UsageError(
            f"--{what}: {', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}"
        )
    return list(dict.fromkeys(names))


@cli.command(
    "compare",
    help="Run every implementation at every precision, each run in a fresh "
    "process, interleaved; write a table (report.md, results.csv, summary.json) and a "
    "chart (benchmark.png) into one folder. An arm keeps its checkpoint only until it "
    "ends ok, so that --resume DIR can finish an interrupted comparison.",
)
@common_options(exclude=("precision", "run_id", "repeat", "keep_checkpoint"))
@click.option(
    "--impls",
    default=",".join(IMPLS),
    help=f"Implementations, comma-separated.  [default: {','.join(IMPLS)}]",
)
@click.option(
    "--precisions",
    default=None,
    help="Precisions, comma-separated.  [default: 32-true and the device's mixed "
    "precision: 16-mixed on CUDA, bf16-mixed on CPU]",
)
@click.option(
    "--repeats",
    default=1,
    type=click.IntRange(min=1, max=1000),
    help="Runs of each (impl, precision), each a fresh process: with one, nothing measures "
    "the noise between processes and the report draws no verdict; 3 or more for verdicts "
    "you can lean on.  [default: 1]",
)
@option("opt_level")
@click.option(
    "--seeds",
    default=1,
    type=click.IntRange(min=1, max=1000),
    help="Train every arm at this many seeds (--seed, --seed + 1, ...), so that an "
    "accuracy change can be weighed against seed-to-seed spread.  [default: 1]",
)
@click.option(
    "--control/--no-control",
    default=True,
    help='Run the plain loop once more at each precision, as "plain (control)": plain '
    "against itself is the report's own noise floor.  [default: --control]",
)
@click.option(
    "--warmup/--no-warmup",
    default=True,
    help="One short untimed run before the first timed one, so that a cold start falls on "
    "no measured run.  [default: --warmup]",
)
def compare_command(impls, precisions, repeats, seeds, control, warmup, **options):
    from ampcompare import compare
    from common import progress

    ctx = click.get_current_context()
    planned = _plan(ctx, impls, precisions, repeats, seeds, control, options)
    _lock(ctx, planned.folder)
    code = 0
    try:
        with progress.Bar(progress.enabled(planned.cfg)) as bar:
            show = _progress(bar, planned)
            done = compare.compare(planned, show=show, warmup=warmup)
            bar.update(completed=len(done), description="done")
    except KeyboardInterrupt:
        console.say(
            f"ampcompare: interrupted; reporting what was measured (finish it with "
            f"ampcompare compare --resume {planned.folder})",
            err=True,
        )
        code = 130
    return _report(planned.folder, code)


def _plan(ctx, impls, precisions, repeats, seeds, control, options) -> "plan.Plan":
    """The comparison to run, fresh or read back from --resume DIR, checked, with its folder."""
    from common import data, model_spec
    from record.rundir import check_out_dir

    if options["resume"]:
        stored = plan.read(os.path.abspath(options["resume"]), tuple(IMPLS))
        given = dict(
            impls=impls,
            precisions=precisions,
            repeats=repeats,
            seeds=seeds,
            control=control,
            **options,
        )
        asked = {k: v for k, v in given.items() if k != "resume" and _given(ctx, k)}
        cfg = config_from(options, stored.cfg.to_dict(), ctx)
        planned = plan.resumed(stored, asked, cfg)
    else:
        cfg = config_from(options).validate()
        planned = plan.fresh(
            cfg,
            _listed_choices(impls, tuple(IMPLS), "impls"),
            _precisions(precisions, cfg),
            repeats,
            seeds,
            control,
        )
    resuming = planned.folder is not None
    check_out_dir(planned.folder or cfg.out_dir, "--resume" if resuming else "--out-dir")
    # A model that cannot train here, or a missing CIFAR-10, is one usage error here, not one
    # per arm (and CIFAR-10 downloads once).
    model_spec.check(planned.cfg.model, planned.cfg.seed)
    data.load(planned.cfg)
    return planned if resuming else plan.start(planned)


def _lock(ctx, folder: str) -> None:
    """Hold folder until the command ends: one compare per folder, never two."""
    try:
        held = rundir.lock(folder, f"--resume {folder}: another compare is running there")
    except OSError as e:
        raise UsageError(f"cannot lock {folder}: {e.strerror}") from None
    ctx.call_on_close(lambda: os.close(held))


def _progress(bar, planned):
    """What compare shows before each arm: a bar on a terminal, else a line per arm."""

    def show(k, n, arm, elapsed):
        seed = f" seed {arm.seed}" if planned.seeds > 1 else ""
        name = "plain (control)" if arm.control else arm.impl
        what = f"{name} {arm.precision}{seed} repeat {arm.repeat + 1}"
        if not bar.on:
            console.say(f"[{k + 1}/{n}] {what}  (elapsed {elapsed:.0f}s)", err=True)
            return
        if k == 0:
            bar.task(what, n)
        bar.update(completed=k, description=f"arm {k + 1}/{n}: {what}")

    return show


def _report(folder: str, code: int) -> int:
    """Write the comparison's report from every record in its folder; the exit code."""
    from ampcompare import report

    records, _ = _records([folder])
    try:
        with signals.deferred():  # a report is written whole; a signal now waits for it
            paths = report.write(records, folder)
    except OSError as e:
        console.say(
            f"ampcompare: error: could not write the report into {folder}: {e.strerror}",
            err=True,
        )
        return 1
    except KeyboardInterrupt:
        console.say(
            f"ampcompare: interrupted; the report is complete (finish the comparison "
            f"with ampcompare compare --resume {folder})",
            err=True,
        )
        return 130
    _echo_report(paths)
    failed = [r for r in records if r["status"] not in ("ok", "unavailable")]
    return code or (1 if failed else 0)


def _records(folders, quiet: bool = False) -> tuple[list, list]:
    """Every run record under the folders, and (path, why) of each file skipped, said in a
    warning line each unless `quiet`."""
    from ampcompare import report

    skipped = []
    records = report.load(folders, skipped)
    for path, why in [] if quiet else skipped:
        console.say(f"ampcompare: warning: skipped {path}: {why}", err=True)
    return records, skipped


def _given(ctx, name: str) -> bool:
    """Whether the option was on the command line (or in the environment); False for one the
    command does not have."""
    return ctx.get_parameter_source(name) not in (
        None,
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    )


def _precisions(value: Optional[str], cfg: Config) -> list[str]:
    from common import precision
    from common.device import resolve_device

    mixed = precision.mixed_default(resolve_device(cfg))
    if value is None:
        return ["32-true", mixed]
    names = _listed_choices(
        value, (*precision.CANONICAL, *precision.ALIASES, "auto"), "precisions"
    )
    return list(
        dict.fromkeys(mixed if p == "auto" else p for p in map(precision.canonical, names))
    )


def _echo_report(paths: dict) -> None:
    with open(paths["report.md"], encoding="utf-8") as f:
        console.say(f.read())
    for name, path in paths.items():
        console.say(f"{name}: {path}")


@cli.command(
    "calibrate",
    help="How often a verdict claims a difference that is not there, on this machine: the "
    "runs of one arm (six or more a cell, e.g. compare --impls plain --repeats 8) split "
    "into two groups of k and compared as two arms, at every k; and how often a slowdown "
    "made in one group is found.",
)
@click.argument(
    "run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)
)
@click.option(
    "--slowdown",
    default=0.05,
    type=click.FloatRange(min=0.0, max=10.0),
    help="Make one group's steps this much slower (0.05: 5%) to measure how often it is "
    "found; 0 measures false differences only.  [default: 0.05]",
)
@click.option(
    "--splits",
    default=400,
    type=click.IntRange(min=1, max=100_000),
    help="Splits drawn at each k where there are more (seeded).  [default: 400]",
)
@click.option(
    "--steps",
    default=None,
    type=click.IntRange(min=1),
    help="Use only each run's first N timed steps (what a shorter run would have "
    "given).  [default: all]",
)
def calibrate_command(run_dirs, slowdown, splits, steps):
    from ampcompare import calibrate

    records, _ = _records(run_dirs)
    console.say(calibrate.run(records, slowdown, splits, steps))
    return 0


@cli.command(
    "report",
    help="Rebuild report.md, results.csv, summary.json and benchmark.png "
    "from saved runs; several folders (e.g. two machines) are grouped by device.",
)
@click.argument(
    "run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)
)
@click.option(
    "--out",
    default=None,
    help="Where to write the report.  [default: the RUN_DIR "
    "when there is one; ./runs/report when there are several]",
)
def report_command(run_dirs, out):
    from ampcompare import report

    out = os.path.abspath(
        out or (run_dirs[0] if len(run_dirs) == 1 else os.path.join("runs", "report"))
    )
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; name a folder")
    records, skipped = _records(run_dirs, quiet=True)
    if not records:
        first = (
            f" ({len(skipped)} skipped; {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        )
        raise UsageError(f"no readable run record under {', '.join(run_dirs)}{first}")
    for path, why in skipped:
        console.say(f"ampcompare: warning: skipped {path}: {why}", err=True)
    try:
        paths = report.write(records, out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the report there ({e.strerror})") from None
    _echo_report(paths)
    return 0
