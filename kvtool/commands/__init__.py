"""CLI commands of the transforms, one module each; importing the package registers them on ``kvtool.cli.app``.

A module here does ``from kvtool.cli import app, fails_cleanly`` and decorates its commands; keep each command
a thin layer that parses options, calls the transform in ``kvtool.convert``, writes outputs atomically and prints
a rich summary.
"""

import importlib
import pkgutil


def load_all() -> None:
    """Import every command module in this package (each registers its commands on the app)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
