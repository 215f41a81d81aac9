"""The ``model-archiver`` command: subcommands wired to the library, errors turned into one line.

``model-archiver --model-name …`` with no subcommand means ``archive``, so TorchServe's command lines work
unchanged. Subcommands live in ``archiver/commands/`` and are imported only when used, so ``--help`` and
bad-flag errors answer without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from archiver import __version__
from archiver.errors import ArchiverError, one_line

PROG = "model-archiver"

# name -> "module:attribute" of the click command.
_COMMANDS = {
    "archive": "archiver.commands.archive:archive",
    "export": "archiver.commands.export:export",
    "inspect": "archiver.commands.inspect:inspect",
    "verify": "archiver.commands.inspect:verify",
    "sign": "archiver.commands.sign:sign",
    "serve": "archiver.commands.serve:serve",
    "predict": "archiver.commands.predict:predict",
    "deploy": "archiver.commands.deploy:deploy",
    "version": "archiver.cli:version",
}
_GROUP_FLAGS = {"--help", "-h", "--about"}


class _ArchiverGroup(click.Group):
    """A group whose commands load lazily and whose default command is ``archive``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in _GROUP_FLAGS:
            args = ["archive", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        archive = self.get_command(ctx, "archive")
        if archive is None:
            return
        rows = [
            rec
            for param in archive.get_params(ctx)
            if (rec := param.get_help_record(ctx)) is not None and "--help" not in rec[0]
        ]
        with formatter.section(
            "Archive options (model-archiver [archive] --model-name NAME -v VERSION --handler H ...)"
        ):
            formatter.write_dl(rows)


@click.group(
    cls=_ArchiverGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--about", is_flag=True, help="Print this tool's own version and exit.")
@click.pass_context
def cli(ctx: click.Context, about: bool) -> None:
    """Build, check and test-serve TorchServe-compatible .mar model archives.

    Called with archive options and no subcommand, it archives, exactly like torch-model-archiver.
    """
    if about:
        click.echo(f"{PROG} {__version__}")
        ctx.exit(0)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@click.command()
def version() -> None:
    """Print this tool's own version (-v/--version is the model's version, as in TorchServe)."""
    click.echo(f"{PROG} {__version__}")


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point: run the CLI and turn every failure into one line and an exit code."""
    debug = os.environ.get("MODEL_ARCHIVER_DEBUG") == "1"
    try:
        code = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.UsageError as exc:
        hint = f"{PROG} {exc.ctx.info_name} --help" if exc.ctx and exc.ctx.parent else f"{PROG} --help"
        if exc.ctx and exc.ctx.command_path:
            hint = f"{exc.ctx.command_path} --help"
        message = one_line(exc.format_message())
        command = exc.ctx.command if exc.ctx else None
        if isinstance(exc, click.exceptions.NoArgsIsHelpError) and isinstance(command, click.Group):
            # a group called bare (`model-archiver deploy`): click's message is its whole help text
            names = ", ".join(command.list_commands(exc.ctx))
            message = f"'{exc.ctx.command_path}' needs a subcommand: {names}"
        click.echo(f"{PROG}: error: {message} (see '{hint}')", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{PROG}: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except ArchiverError as exc:
        if debug:
            raise
        click.echo(f"{PROG}: error: {one_line(exc.message)}", err=True)
        trace = getattr(exc, "trace", None)  # a handler's failure: its frames in the archive's files
        for line in trace.frame_lines() if trace is not None else ():
            click.echo(line, err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{PROG}: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"{PROG}: error: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    except Exception as exc:  # the edge: nothing below it may print a traceback at a user
        if debug:
            raise
        click.echo(
            f"{PROG}: internal error: {type(exc).__name__}: {one_line(str(exc))} "
            "(set MODEL_ARCHIVER_DEBUG=1 for the traceback, and please report it)",
            err=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
