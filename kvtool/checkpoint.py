"""Writing outputs atomically: a temporary sibling folder that is renamed into place when complete.

Every kvtool output folder holds ``kvtool.json`` (what produced it). Model checkpoints add
``config.json`` and ``*.safetensors`` shards (with ``model.safetensors.index.json`` when sharded).
"""

from __future__ import annotations

import contextlib
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


def written_by_kvtool(folder: Path) -> bool:
    """A folder kvtool wrote: a method output (``kvtool.json``) or a statistics folder (manifest + tensors)."""
    return (folder / MANIFEST).is_file() or ((folder / "manifest.json").is_file()
                                             and (folder / "stats.safetensors").is_file())


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def local_input(arg: str | Path | None) -> Path | None:
    """A model/data argument as a local path when it names one (None for hub ids and the embedded model)."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    return path if path.exists() else None


def check_output_location(out: str | Path, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """The output may not be the working directory or an ancestor of it, nor an input or an ancestor of one."""
    out = Path(out).expanduser()
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise KvtoolError(f"output {out} is the working directory or contains it: give -o a new folder")
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if target == src or target in src.parents:
            raise KvtoolError(f"output {out} is or contains the input {inp}: give -o a folder outside the inputs")
    return out


def check_output_dir(out: str | Path, overwrite: bool = False, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Check an output folder before any work; raise a one-line KvtoolError when it may not be written.

    The output may not be the working directory or an ancestor of it, nor an input (the source model, a
    statistics folder) or an ancestor of one. An existing non-empty folder is replaced only with ``overwrite`` and
    only when kvtool wrote it. The nearest existing ancestor must be a folder we can create entries in, and the
    temporary sibling's name must fit the file system (255 bytes).
    """
    out = check_output_location(out, inputs)
    target = out.resolve()
    if target.exists():
        if not target.is_dir():
            raise KvtoolError(f"output {out} exists and is not a folder: choose another -o")
        if any(target.iterdir()):
            if not overwrite:
                raise KvtoolError(f"output {out} already exists: choose another -o or pass --overwrite")
            if not written_by_kvtool(target):
                raise KvtoolError(f"output {out} exists and was not written by kvtool (no {MANIFEST}): --overwrite "
                                  "replaces only kvtool outputs; choose another -o")
    if len((_tmp_prefix(target.name) + "0000000-xxxxxxxx").encode()) > 255:
        raise KvtoolError(f"output name {target.name[:40]}... is too long for the file system: use a shorter -o")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise KvtoolError(f"output {out} lies under {ancestor}, which is a file: choose another -o")
    try:  # a real probe: permission bits say nothing on read-only file systems
        Path(tempfile.mkdtemp(prefix=".kvtool-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise KvtoolError(f"cannot write output {out} ({exc.strerror} in {ancestor}): choose a writable -o") from None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders beside an output whose process is gone (left by a
    killed run); returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        for kind in (".tmp-", ".old-"):
            head = f".{name}{kind}"
            if entry.name.startswith(head) and entry.is_dir():
                pid = entry.name[len(head):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: tuple[str | Path | None, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (the new folder is complete before
    the old one goes), on failure or interruption it is removed along with any parent folders it created."""
    out = check_output_dir(out, overwrite, inputs)
    target = out.resolve()
    created = []
    parent = target.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    remove_stale_temporaries(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(target.name)}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        record_checksums(tmp)
        if target.exists() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def record_checksums(folder: Path) -> None:
    """Add ``checksums`` (sha256 of every other file, by relative path) to the folder's kvtool.json, if it has one."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    data = json.loads(manifest.read_text())
    data["checksums"] = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
                         if p.is_file() and p != manifest}
    write_json(manifest, data)


def verify_checksums(folder: Path) -> None:
    """Raise a one-line KvtoolError naming the first file whose bytes differ from kvtool.json's checksums."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return
    for rel, digest in (json.loads(manifest.read_text()).get("checksums") or {}).items():
        path = Path(folder) / rel
        if not path.is_file() or file_sha256(path) != digest:
            raise KvtoolError(f"{path} is damaged or missing (its checksum differs from {manifest}): rewrite the "
                              "output with kvtool")


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
                 prefix: str = "model") -> list[str]:
    """Save tensors as safetensors shards (HF naming); returns the file names written.

    The header's metadata is the single entry ``format: pt``: safetensors writes its metadata map in hash order,
    so more than one entry would make the same tensors give different bytes from run to run."""
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
    meta = {"format": "pt"}
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
    """The content of ``kvtool.json``: tool version, command, options, source model, statistics, report (no wall-clock
    fields: the same command gives the same bytes; :func:`atomic_dir` adds the checksums of the files written)."""
    from kvtool import __version__

    return {
        "kvtool_version": __version__,
        "command": command,
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
