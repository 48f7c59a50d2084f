"""Writing outputs atomically: a temporary sibling folder that is renamed into place when complete.

Every kvtool output folder holds ``kvtool.json`` (what produced it). Model checkpoints add
``config.json`` and ``*.safetensors`` shards (with ``model.safetensors.index.json`` when sharded).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvtool.errors import KvtoolError

MANIFEST = "kvtool.json"
DEFAULT_SHARD_BYTES = 4 << 30


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Validate an output folder before any work: it may not exist (or must be replaceable)."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise KvtoolError(f"output {out} already exists: choose another -o or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise KvtoolError(f"output {out} exists and is not a folder: choose another -o")
    parent = out.resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = check_output_dir(out, overwrite)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON with stable formatting."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    raise TypeError(f"not JSON serializable: {type(o)}")


def save_tensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 prefix: str = "model", metadata: dict[str, str] | None = None) -> list[str]:
    """Save tensors as safetensors shards (HF naming); returns the file names written."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / f"{prefix}.safetensors"), metadata=meta)
        return [f"{prefix}.safetensors"]
    names = []
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / f"{prefix}.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def untie_for_saving(state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Drop ``lm_head.weight`` when tied to the embeddings (safetensors refuses shared storage)."""
    if tie_word_embeddings and "lm_head.weight" in state:
        state = dict(state)
        del state["lm_head.weight"]
    return state


def file_sha256(path: Path) -> str:
    """sha256 of one file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def provenance(command: str, options: dict[str, Any], model: dict[str, Any] | None = None,
               statistics: dict[str, Any] | None = None, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``kvtool.json``: tool version, command, options, source model, statistics, report."""
    from kvtool import __version__

    return {
        "kvtool_version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "options": options,
        "model": model,
        "statistics": statistics,
        "report": report,
    }


def save_model_checkpoint(directory: Path, state: dict[str, torch.Tensor], config: Any,
                          manifest: dict[str, Any], tokenizer: Any = None, generation_config: Any = None) -> None:
    """Write a loadable HF checkpoint into ``directory``: config.json, safetensors shards, kvtool.json, tokenizer.

    ``config`` is a transformers config (or a plain dict written as config.json). Tied ``lm_head.weight`` is
    dropped when ``tie_word_embeddings`` is set. Use inside :func:`atomic_dir`.
    """
    if isinstance(config, dict):
        tie = bool(config.get("tie_word_embeddings", False))
        write_json(directory / "config.json", config)
    else:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        tie = bool(getattr(config, "tie_word_embeddings", False))
        config.save_pretrained(directory)
    save_tensors(directory, untie_for_saving(state, tie))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    write_json(directory / MANIFEST, manifest)
