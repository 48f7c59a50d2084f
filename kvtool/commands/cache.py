"""``kvtool cache``: what kvtool keeps in its cache (dequantized GGUF models, file hashes), and clearing it."""

from __future__ import annotations

from typing import Annotated

import typer


def cache_(
    clear: Annotated[bool, typer.Option("--clear", help="Delete everything in the cache (it is rebuilt on demand).")
                     ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the listing as JSON on stdout.")] = False,
) -> None:
    """List kvtool's cache ($KVTOOL_CACHE or ~/.cache/kvtool) with sizes, or clear it.

    A .gguf model is dequantized to float32 safetensors once and kept here (SmolLM2-135M: ~0.5 GB); nothing
    else grows. Examples:
      kvtool cache
      kvtool cache --clear
    """
    import shutil

    from kvtool.commands.console import print_json, print_table
    from kvtool.models import cache_dir

    root = cache_dir()
    entries = []
    for path in sorted(root.glob("*")) + sorted(root.glob("models/*")):
        if path.name == "models":
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        entries.append({"path": str(path), "bytes": size})
    if clear and root.exists():
        shutil.rmtree(root)
    result = {"cache": str(root), "entries": entries, "total_bytes": sum(e["bytes"] for e in entries),
              "cleared": clear}
    if as_json:
        print_json(result)
        return
    rows = [[e["path"], f"{e['bytes'] / 2**20:.1f}"] for e in entries]
    notes = [f"total {result['total_bytes'] / 2**20:.1f} MiB" + (" (cleared)" if clear else "")]
    print_table(f"kvtool cache: {root}", ["entry", "MiB"], rows, notes)
