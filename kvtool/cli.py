"""kvtool command line: typer only. Each verb parses options, dispatches to the library, prints a summary.

Bad input raises :class:`kvtool.errors.KvtoolError`, printed as one ``error:`` line with exit code 2; usage errors
(unknown flags, wrong types) are printed the same way. ``kvtool --help`` imports no torch (lazy imports).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from kvtool.commands.console import error
from kvtool.errors import KvtoolError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="kvtool: offline model conversion for cheaper LLM serving (calibration statistics, "
                       "GQA->MLA, CorDA, 2-bit KV, Ladder residual).")

def _version(value: bool) -> None:
    if value:
        from kvtool import __version__

        print(f"kvtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print kvtool's version and exit.")] = False) -> None:
    """kvtool: offline model conversion for cheaper LLM serving."""


def _register() -> None:
    from kvtool.commands import register_all

    register_all(app)


_register()


def main() -> None:
    """Console-script entry point: usage errors and KvtoolError become one ``error:`` line, exit code 2."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # kvtool shows its own progress
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        rc = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        error("interrupted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: unknown option or command, bad value, missing option
        format_message = getattr(exc, "format_message", None)
        msg = (format_message() if format_message else str(exc)).replace("\n", " ").rstrip(".")
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else " (see `kvtool --help`)"
        error(msg.replace("[", r"\[") + hint)
        sys.exit(2)
    except KvtoolError as exc:
        error(str(exc).replace("[", r"\["))
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
