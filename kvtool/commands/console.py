"""What every verb prints: one ``error:`` line for bad input, JSON with ``--json``, rich tables otherwise."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from kvtool.errors import KvtoolError

console = Console(stderr=True)
out_console = Console()


def error(message: str) -> None:
    """Print one ``error:`` line on stderr."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def fails_cleanly(fn: Callable) -> Callable:
    """Turn KvtoolError into one 'error:' line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KvtoolError as exc:
            error(str(exc).replace("[", r"\["))
            raise typer.Exit(2) from None
    return wrapper


def print_json(obj: Any) -> None:
    """A result as JSON on stdout (``--json``)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    """A rich table on stdout, then notes."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    if columns:
        out_console.print(table)
    for note in notes:
        out_console.print(note, highlight=False)
