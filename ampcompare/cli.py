"""The ampcompare command line. Each command imports its implementation only when it runs:
`ampcompare plain` never imports Lightning or apex, and a missing apex breaks nothing else."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Optional

import click
from click.core import ParameterSource

from ampcompare import plan, quiet, run
from ampcompare.run import IMPLS
from common import console, ranks
from record import signals
from common.config import Config, option_flag
from common.errors import Unavailable, UsageError, unavailable_exit
from record.resume import check_options, read_stopped

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
    """One line on stderr; in a job of several processes, one per node (ranks.speaks)."""
    if ranks.speaks():
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
                f"set without the rest of a launcher's variables: no launcher started this "
                f"process, so {'it is' if len(stray) == 1 else 'they are'} ignored"
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
            _say(f"ampcompare: error{ranks.who()}: {one_line(e.format_message())}")
            code = 2
        except UsageError as e:
            _say(f"ampcompare: error{ranks.who()}: {one_line(str(e))}")
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


def arm_config(impl: str, options: dict) -> Config:
    if not options.get("resume"):
        return config_from(options)
    stored = read_stopped(options["resume"], impl)[0].config
    cfg = config_from(options, stored, click.get_current_context())
    # A changed option is named as such, before validate() would name the clash it makes
    # with one unchanged; compared in the form the record keeps (bf16: bf16-mixed).
    check_options(f"--resume {options['resume']}", stored, cfg.each_checked().to_dict())
    resume = os.path.abspath(cfg.resume)  # the run lives where it is now, wherever it began
    cfg.out_dir, cfg.run_id = os.path.dirname(resume), os.path.basename(resume)
    return cfg


def _impl_command(impl: str, doc: str):
    @cli.command(impl, help=doc)
    @common_options
    def command(**options):
        return run.run_one(impl, arm_config(impl, options))

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
    return run.run_one("apex", arm_config("apex", options))


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
    type=click.IntRange(min=2, max=1000),
    help="Timed rounds (epochs) of the small-CNN and loader measurements, in each "
    "process; 2 at least, the fewest whose spread gives a process its interval.  "
    "[default: 2]",
)
@click.option(
    "--linear-rounds",
    default=70,
    type=click.IntRange(min=2, max=100_000),
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
    from common.device import resolve_device

    resolve_device(base)  # no GPU for --accelerator cuda: one line, before any process
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
    help="Precisions, comma-separated, from the ladder 32-true, 16-mixed, bf16-mixed, "
    "bf16-true, 16-true, and with --strategy fsdp bf16-fsdp.  [default: 32-true and the "
    "device's mixed precision: 16-mixed on CUDA, bf16-mixed on CPU]",
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
    from ampcompare import compare, report
    from common import progress

    ctx = click.get_current_context()
    planned = _plan(ctx, impls, precisions, repeats, seeds, control, options)
    compare.lock(ctx, planned.folder)
    code = 0
    try:
        with progress.Bar(progress.enabled(planned.cfg)) as bar:
            show = compare.progress_lines(bar, planned)
            done = compare.compare(planned, show=show, warmup=warmup)
            bar.update(completed=len(done), description="done")
    except KeyboardInterrupt:
        console.say(
            f"ampcompare: interrupted; reporting what was measured (finish it with "
            f"ampcompare compare --resume {planned.folder})",
            err=True,
        )
        code = 130
    return report.write_for_compare(planned.folder, code, planned.arms())


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
        # the lists as a fresh compare reads them (aliases, repeats, order): the same names
        # as the comparison's are no change
        listed = {
            "impls": lambda v: _listed_choices(v, tuple(IMPLS), "impls"),
            "precisions": lambda v: _precisions(v, cfg),
        }
        for name, read in listed.items():
            if name in asked and set(read(asked[name])) == set(getattr(stored, name)):
                del asked[name]
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


class FiniteRange(click.FloatRange):
    """click's FloatRange, which lets nan through (it compares false with both bounds)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


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
    type=FiniteRange(min=0.0, max=10.0),
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
    from ampcompare import calibrate, report

    records, _ = report.records_in(run_dirs)
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
    for name in report.FILES:  # said before any of them is written
        if os.path.isdir(os.path.join(out, name)):
            raise UsageError(f"--out {out}: its {name} is a folder; the report writes a file")
    records, skipped = report.records_in(run_dirs, quiet=True)
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
    report.echo(paths)
    return 0
