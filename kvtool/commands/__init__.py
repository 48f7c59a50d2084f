"""The CLI verbs, one module each; :func:`register_all` adds them to the typer app.

Every method in :data:`kvtool.methods.METHODS` gets a verb built from its Options (:mod:`kvtool.commands.method`);
the others (calibrate, eval, stats, validate, run) are written out.
"""

from __future__ import annotations

import typer


def register_all(app: typer.Typer) -> None:
    """Add every verb to ``app``."""
    from kvtool.commands import cache, calibrate, evaluate, gguf, method, run, stats, validate
    from kvtool.commands.console import fails_cleanly
    from kvtool.commands.options import keep_layout
    from kvtool.methods import METHODS

    calibrate.register(app)
    for m in METHODS.values():
        method.register(app, m)
    for name, fn in (("eval", evaluate.eval_), ("stats", stats.stats_), ("validate", validate.validate_),
                     ("run", run.run_), ("cache", cache.cache_),
                     ("export-gguf", gguf.export_gguf_)):
        fn.__doc__ = keep_layout(fn.__doc__)
        app.command(name)(fails_cleanly(fn))
