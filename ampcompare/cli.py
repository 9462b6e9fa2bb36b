"""The ampcompare command line. Each command imports its implementation only when it runs:
`ampcompare plain` never imports Lightning or apex, and a missing apex breaks nothing else."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import signal
import sys

import click

from common.config import Config
from common.errors import UsageError

IMPLS = {"plain": "plain_torch.train", "lightning": "lightning_impl.train",
         "apex": "apex_impl.train"}
# click 8.2 raises this for a bare `ampcompare`; 8.1 prints the help itself.
NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def option(name: str):
    """The click option of one Config field: its flag, type, default and help come from it."""
    fld = FIELDS[name]
    spec, default = fld.metadata["click"], fld.default
    shown = spec.get("shown", default if default is not None else "none")
    if isinstance(default, bool):
        shown = spec["flag"].split("/")[0 if default else 1]
    kwargs = {"default": default, "help": f"{fld.metadata['help']}  [default: {shown}]",
              "show_default": False}
    if "choices" in spec:
        kwargs["type"] = click.Choice(spec["choices"])
    elif "type" in spec or default not in (None, True, False):  # flags: click infers them
        kwargs["type"] = spec.get("type", type(default))
    decls = [spec.get("flag", f"--{name.replace('_', '-')}")]
    return click.option(*decls, name, **kwargs)


def common_options(command=None, *, exclude=()):
    """The COMMON option bundle: one click option per Config field, default and help from it."""
    if command is None:
        return functools.partial(common_options, exclude=exclude)
    for name, fld in reversed(FIELDS.items()):
        if fld.metadata["common"] and name not in exclude:
            command = option(name)(command)
    return command


def config_from(options: dict) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in options.items() if k in names})


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class OneLineErrors(click.Group):
    """Usage and environment errors print one line and exit 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        # SIGTERM (a scheduler, `timeout`) ends a run the way Ctrl-C does: partial result kept.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            code = super().main(args=args, prog_name=prog_name or "ampcompare",
                                standalone_mode=False, **extra)
        except NO_ARGS as e:
            click.echo(e.ctx.get_help())
            code = 0
        except click.ClickException as e:
            click.echo(f"ampcompare: error: {e.format_message()}", err=True)
            code = 2
        except UsageError as e:
            click.echo(f"ampcompare: error: {e}", err=True)
            code = 2
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo("ampcompare: interrupted", err=True)
            code = 130
        sys.exit(code or 0)


@click.group(cls=OneLineErrors, no_args_is_help=True)
@click.version_option(package_name="ampcompare")
def cli():
    """One CIFAR-10 training loop written three times (plain PyTorch, NVIDIA apex, PyTorch
    Lightning) to compare mixed-precision speed, memory and accuracy side by side."""


def run_one(impl: str, cfg: Config) -> int:
    """Run one implementation in this process; print where its result is. Returns the exit code."""
    if impl == "apex":  # say what apex lacks before its loop module is even imported
        from apex_impl.opt_levels import check
        check(cfg)
    try:
        module = importlib.import_module(IMPLS[impl])
    except ImportError as e:
        raise UsageError(f"{impl}: cannot import its framework ({e})") from None
    result = module.train(cfg)
    s = result.summary
    acc = f"{s['final_test_acc']:.4f}" if s.get("final_test_acc") is not None else "-"
    t = f"{s['median_epoch_time_s']:.2f}s" if s.get("median_epoch_time_s") is not None else "-"
    click.echo(f"{impl} {result.precision['effective']}: {result.status}, "
               f"test acc {acc}, median epoch {t}")
    if result.error:
        click.echo(f"error: {result.error}", err=True)
    click.echo(f"result: {cfg.out_dir.rstrip('/')}/{result.run_id}/result.json")
    return result.exit_code


def _impl_command(impl: str, doc: str):
    @cli.command(impl, help=doc)
    @common_options
    def command(**options):
        return run_one(impl, config_from(options))
    return command


plain = _impl_command("plain", "The hand-written loop: torch.autocast + torch.amp.GradScaler.")
lightning = _impl_command("lightning", "PyTorch Lightning: Trainer(precision=...).")


@cli.command("apex", help="NVIDIA apex: amp.initialize + amp.scale_loss (needs CUDA and apex "
             "25.04 or older).")
@common_options
@option("opt_level")
def apex(**options):
    return run_one("apex", config_from(options))


def _names(value: str, allowed, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UsageError(f"--{what}: {', '.join(bad) or 'nothing given'}; choose from "
                         f"{', '.join(allowed)}")
    return list(dict.fromkeys(names))


@cli.command("compare", help="Run every implementation at every precision, each run in a fresh "
             "process, interleaved; write a table (report.md, results.csv, summary.json) and a "
             "chart (benchmark.png) into one folder. It measures: no run keeps a checkpoint.")
@common_options(exclude=("precision", "run_id", "checkpoint", "repeat"))
@click.option("--impls", default="plain,lightning,apex",
              help="Implementations, comma-separated.  [default: plain,lightning,apex]")
@click.option("--precisions", default=None,
              help="Precisions, comma-separated.  [default: 32-true and the device's mixed "
                   "precision: 16-mixed on CUDA, bf16-mixed on CPU]")
@click.option("--repeats", default=1, type=click.IntRange(min=1),
              help="Runs of each (impl, precision); spreads are min–max over them.  [default: 1]")
def compare_command(impls, precisions, repeats, **options):
    from ampcompare import compare, report
    from common import data, precision, progress
    from common.device import resolve_device
    from common.results import check_out_dir

    # No checkpoints: a ResNet-18 with Adam state is 128 MiB a run.
    cfg = config_from({**options, "checkpoint": False}).validate()
    impls = _names(impls, tuple(IMPLS), "impls")
    mixed = precision.mixed_default(resolve_device(cfg))
    if precisions is None:
        precisions = ["32-true", mixed]
    else:
        names = _names(precisions, (*precision.CANONICAL, *precision.ALIASES, "auto"), "precisions")
        precisions = list(dict.fromkeys(
            mixed if p == "auto" else p for p in map(precision.canonical, names)))
    check_out_dir(cfg.out_dir)
    # A missing CIFAR-10 is one usage error here, not one per arm (and it downloads once).
    data.load(cfg)
    folder, code = compare.new_folder(cfg.out_dir), 0
    try:
        with progress.Bar(progress.enabled(cfg)) as bar:
            def show(k, n, arm, elapsed):
                what = f"{arm.impl} {arm.precision} repeat {arm.repeat + 1}"
                if not bar.on:  # a line per arm off the terminal
                    click.echo(f"[{k + 1}/{n}] {what}  (elapsed {elapsed:.0f}s)", err=True)
                    return
                if k == 0:
                    bar.task(what, n)
                bar.update(completed=k, description=f"arm {k + 1}/{n}: {what}")
            done = compare.compare(cfg, impls, precisions, repeats, folder, show=show)
            bar.update(completed=len(done), description="done")
    except KeyboardInterrupt:
        click.echo("ampcompare: interrupted; reporting what was measured", err=True)
        code = 130
    records = report.load([folder])
    paths = report.write(records, folder)
    _echo_report(paths)
    failed = [r for r in records if r["status"] not in ("ok", "unavailable")]
    return code or (1 if failed else 0)


def _echo_report(paths: dict) -> None:
    with open(paths["report.md"]) as f:
        click.echo(f.read())
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


@cli.command("report", help="Rebuild report.md, results.csv, summary.json and benchmark.png "
             "from saved runs; several folders (e.g. two machines) are grouped by device.")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, help="Where to write the report.  [default: the RUN_DIR "
              "when there is one; ./runs/report when there are several]")
def report_command(run_dirs, out):
    from ampcompare import report

    records = report.load(run_dirs)
    if not records:
        raise UsageError(f"no result.json under {', '.join(run_dirs)}")
    out = out or (run_dirs[0] if len(run_dirs) == 1 else os.path.join("runs", "report"))
    _echo_report(report.write(records, out))
    return 0


def main():
    cli.main()


if __name__ == "__main__":
    main()
