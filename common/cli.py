"""The ampcompare command line. Each command imports its implementation only when it runs:
`ampcompare plain` never imports Lightning or apex, and a missing apex breaks nothing else."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import sys

import click

from common.config import Config
from common.errors import UsageError

IMPLS = {"plain": "plain_torch.train", "lightning": "lightning_impl.train",
         "apex": "apex_impl.train"}
PRECISION_HELP_NAMES = "32-true, 16-mixed, bf16-mixed"


def _option(fld: dataclasses.Field):
    spec = fld.metadata["click"]
    default = fld.default
    shown = spec.get("show", default if default is not None else "none")
    if isinstance(default, bool):
        shown = spec["flag"].split("/")[0 if default else 1]
    help_text = f"{fld.metadata['help']}  [default: {shown}]"
    decls = [spec.get("flag", f"--{fld.name.replace('_', '-')}")]
    kwargs = {"default": default, "help": help_text, "show_default": False}
    if "choices" in spec:
        kwargs["type"] = click.Choice(spec["choices"])
    elif isinstance(default, bool):
        pass
    elif fld.name.startswith("limit_"):
        kwargs["type"] = int
    elif default is not None:
        kwargs["type"] = type(default)
    return click.option(*decls, fld.name, **kwargs)


def common_options(command):
    """The COMMON option bundle: one click option per Config field, default and help from it."""
    for fld in reversed(dataclasses.fields(Config)):
        if "click" in fld.metadata:
            command = _option(fld)(command)
    return command


def config_from(options: dict, **extra) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in options.items() if k in names}, **extra)


class OneLineErrors(click.Group):
    """Usage and environment errors print one line and exit 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name or "ampcompare",
                                standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
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
        from apex_impl.policy import check
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
@click.option("--opt-level", type=click.Choice(["O0", "O1", "O2", "O3"]), default=None,
              help="apex opt level  [default: O0 for 32-true, O1 for 16-mixed]")
def apex(**options):
    return run_one("apex", config_from(options))


def main():
    cli.main()


if __name__ == "__main__":
    main()
