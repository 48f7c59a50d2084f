"""The CLI verbs, one module each; :func:`register_all` adds them to the typer app.

Every method in :data:`kvtool.methods.METHODS` gets a verb built from its Options (:mod:`kvtool.commands.method`);
the others (calibrate, eval, stats, validate, run) are written out.
"""

from __future__ import annotations

import typer


def register_all(app: typer.Typer) -> None:
    """Add every verb to ``app``."""
    from kvtool.commands import calibrate, evaluate, method, run, stats, validate
    from kvtool.methods import METHODS

    calibrate.register(app)
    for m in METHODS.values():
        method.register(app, m)
    evaluate.register(app)
    stats.register(app)
    validate.register(app)
    run.register(app)
