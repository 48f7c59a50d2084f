"""Text sources -> fixed-length token windows.

``--dataset`` accepts:

* ``embedded`` (default): the Python reference documentation shipped with CPython (``pydoc_data.topics``).
  Topics are sorted by name and joined; the first 80 % of topics (by count) is the calibration part,
  the remaining 20 % the held-out part used by ``kvtool eval``. The two parts share no topic.
* a local ``.txt``/``.md`` file, a ``.jsonl``/``.json``/``.parquet`` file (``--text-field``, default ``text``),
  or a folder of such files;
* a hub dataset ``NAME`` or ``NAME:CONFIG`` (its ``train`` split), through ``datasets``.

Every source has the same disjoint calibration / held-out split (``--split calib|heldout|all``): with at least
five documents (records, or files of a folder, in order), the first 80 % of the documents calibrate and the rest
are held out; a source with fewer documents (e.g. one ``.txt`` file) is cut at 80 % of its characters (at the
next whitespace): the text before the cut calibrates, the text after it is held out. Calibration windows come
from the calibration part only and ``kvtool eval`` scores the held-out part by default, so no calibration token
is ever scored.

Windows are non-overlapping slices of the concatenated token stream, chosen with a seeded permutation,
so the same (source, samples, seq-len, seed) always gives the same windows.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvtool.errors import KvtoolError

EMBEDDED = "embedded"
EMBEDDED_CALIB_FRACTION = 0.8
CALIB_FRACTION = 0.8  # every source: the calibration share of its documents (or characters)
MIN_DOCUMENTS = 5  # below this many documents a source is split by characters
SPLITS = ("calib", "heldout", "all")
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_SUFFIXES = {".txt", ".md", ".rst"}


@dataclass(frozen=True)
class TextSource:
    """Which text to read: a source name or path, a split (``calib``/``heldout`` for embedded), a record field."""

    dataset: str = EMBEDDED
    split: str = "calib"
    text_field: str = "text"

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def embedded_text(part: str) -> str:
    """The calibration (``calib``) or held-out (``heldout``) part of the embedded Python reference text."""
    import pydoc_data.topics as topics

    names = sorted(topics.topics)
    cut = int(len(names) * EMBEDDED_CALIB_FRACTION)
    if part == "calib":
        chosen = names[:cut]
    elif part in ("heldout", "test", "validation"):
        chosen = names[cut:]
    else:
        raise KvtoolError(f"unknown split {part!r} for the embedded text: use calib or heldout")
    return "\n\n".join(topics.topics[n] for n in chosen)


def _files_in(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES or p.suffix in RECORD_SUFFIXES)
    if not files:
        raise KvtoolError(f"no .txt/.md/.jsonl/.json/.parquet files under {path}")
    return files


def _records_text(files: list[Path], kind: str, field: str) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise KvtoolError(f"could not read {files[0]} as {kind}: {exc}".splitlines()[0]) from exc
    if field not in ds.column_names:
        raise KvtoolError(f"no field {field!r} in {files[0]} (fields: {', '.join(ds.column_names)}): "
                          "pass --text-field")
    return [t for t in ds[field] if isinstance(t, str) and t]


def documents(source: TextSource) -> list[str]:
    """Every document of a non-embedded source, in order (files of a folder sorted by path; records in order)."""
    path = Path(source.dataset).expanduser()
    if path.exists():
        texts: list[str] = []
        for f in _files_in(path):
            kind = RECORD_SUFFIXES.get(f.suffix)
            texts += _records_text([f], kind, source.text_field) if kind else [
                f.read_text(encoding="utf-8", errors="replace")]
        return texts
    suffixes = tuple(TEXT_SUFFIXES | set(RECORD_SUFFIXES))
    if source.dataset.startswith((".", "/", "~")) or source.dataset.endswith(suffixes):
        raise KvtoolError(f"dataset path {source.dataset} does not exist: give an existing file or folder, "
                          "a hub dataset name, or 'embedded'")
    return _hub_documents(source)


def split_documents(docs: list[str], part: str) -> list[str]:
    """The ``calib`` / ``heldout`` / ``all`` part of a list of documents (the rule in the module docstring)."""
    if part not in SPLITS:
        raise KvtoolError(f"unknown split {part!r}: use calib, heldout or all")
    if part == "all":
        return docs
    if len(docs) >= MIN_DOCUMENTS:
        cut = int(len(docs) * CALIB_FRACTION)
        return docs[:cut] if part == "calib" else docs[cut:]
    text = "\n\n".join(docs)
    cut = int(len(text) * CALIB_FRACTION)
    while cut < len(text) and not text[cut].isspace():
        cut += 1
    return [text[:cut]] if part == "calib" else [text[cut:]]


def load_text(source: TextSource) -> str:
    """The text of a source's split (``calib``, ``heldout`` or ``all``), documents joined with blank lines."""
    if source.dataset == EMBEDDED:
        if source.split == "all":
            return embedded_text("calib") + "\n\n" + embedded_text("heldout")
        return embedded_text(source.split)
    return "\n\n".join(split_documents(documents(source), source.split))


def _hub_documents(source: TextSource) -> list[str]:
    from datasets import load_dataset

    name, _, config = source.dataset.partition(":")
    try:
        ds = load_dataset(name, config or None, split="train")
    except Exception as exc:
        raise KvtoolError(f"could not load dataset {source.dataset!r} from the hub (offline or not found): give a "
                          "local file or folder instead") from exc
    if source.text_field not in ds.column_names:
        raise KvtoolError(f"no field {source.text_field!r} in {source.dataset} "
                          f"(fields: {', '.join(ds.column_names)}): pass --text-field")
    return [t for t in ds[source.text_field] if isinstance(t, str) and t]


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of ``text`` as one long int64 stream (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` tokens, picked by a seeded permutation.

    Raises KvtoolError when the stream holds fewer than ``samples * seq_len`` tokens.
    """
    if samples < 1 or seq_len < 2:
        raise KvtoolError(f"need samples >= 1 and seq-len >= 2 (got {samples}, {seq_len})")
    available = tokens.numel() // seq_len
    if available < samples:
        raise KvtoolError(f"the text has {tokens.numel()} tokens, enough for {available} windows of {seq_len}, "
                          f"but {samples} were requested: lower --samples or --seq-len, or give more text")
    order = list(range(available))
    random.Random(seed).shuffle(order)
    starts = sorted(order[:samples])
    return torch.stack([tokens[s * seq_len:(s + 1) * seq_len] for s in starts])


def calibration_windows(tokenizer: Any, source: TextSource, samples: int, seq_len: int, seed: int = 0,
                        max_positions: int | None = None) -> torch.Tensor:
    """Load, tokenize and cut a source into calibration windows (samples x seq_len int64)."""
    if max_positions and seq_len > max_positions:
        raise KvtoolError(f"seq-len {seq_len} exceeds the model's context of {max_positions} tokens: "
                          f"use --seq-len {max_positions} or less")
    text = load_text(source)
    return make_windows(tokenize(text, tokenizer), samples, seq_len, seed)


def heldout_tokens(tokenizer: Any, source: TextSource, max_tokens: int | None = None) -> torch.Tensor:
    """The token stream used for perplexity, truncated to ``max_tokens``."""
    tokens = tokenize(load_text(source), tokenizer)
    return tokens[:max_tokens] if max_tokens else tokens
