"""Text sources and windows."""

from __future__ import annotations

import json

import pytest
import torch

from kvtool.data import TextSource, embedded_text, load_text, make_windows
from kvtool.errors import KvtoolError


def test_embedded_parts_are_disjoint_and_nonempty():
    calib, held = embedded_text("calib"), embedded_text("heldout")
    assert len(calib) > 200_000 and len(held) > 50_000
    import pydoc_data.topics as t

    calib_topics = {k for k, v in t.topics.items() if v and v in calib}
    held_topics = {k for k, v in t.topics.items() if v and v in held}
    assert calib_topics and held_topics and not (calib_topics & held_topics)


def test_windows_are_seeded_and_non_overlapping():
    tokens = torch.arange(1000)
    a = make_windows(tokens, 10, 50, seed=3)
    assert torch.equal(a, make_windows(tokens, 10, 50, seed=3))
    assert not torch.equal(a, make_windows(tokens, 10, 50, seed=4))
    starts = a[:, 0].tolist()
    assert len(set(starts)) == 10 and all(s % 50 == 0 for s in starts)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(KvtoolError, match="enough for 20 windows of 50, but 21 were requested"):
        make_windows(torch.arange(1000), 21, 50)


def test_local_text_and_records(tmp_path):
    (tmp_path / "a.txt").write_text("plain text here")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"record {i}"}) for i in range(3)))
    text = load_text(TextSource(str(tmp_path), split="all", text_field="body"))
    assert "plain text here" in text and "record 2" in text
    with pytest.raises(KvtoolError, match="no field 'text'"):
        load_text(TextSource(str(tmp_path / "b.jsonl")))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(KvtoolError, match="does not exist"):
        load_text(TextSource(str(tmp_path / "nope.txt")))


def _sources(tmp_path):
    """The same user text as one .txt, a .jsonl of records, a .parquet of records, and a folder of files."""
    import pandas as pd

    from kvtool.data import embedded_text

    paragraphs = [p for p in embedded_text("heldout").split("\n\n") if len(p) > 200][:60]
    (tmp_path / "one.txt").write_text("\n\n".join(paragraphs))
    (tmp_path / "recs.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    pd.DataFrame({"text": paragraphs}).to_parquet(tmp_path / "recs.parquet")
    (tmp_path / "folder").mkdir()
    for i, p in enumerate(paragraphs):
        (tmp_path / "folder" / f"doc{i:03d}.txt").write_text(p)
    return ["one.txt", "recs.jsonl", "recs.parquet", "folder"]


def test_every_source_has_disjoint_calibration_and_heldout_parts(tmp_path, tiny_tokenizer):
    """No calibration window occurs in the held-out tokens (what `kvtool eval` scores by default), for a .txt, a
    .jsonl, a .parquet and a folder; `all` is both parts."""
    from kvtool.data import calibration_windows, heldout_tokens

    for name in _sources(tmp_path):
        src = str(tmp_path / name)
        calib, held = load_text(TextSource(src, "calib")), load_text(TextSource(src, "heldout"))
        assert calib and held and len(held) < len(calib)
        assert held.strip()[:200] not in calib and calib.strip()[-200:] not in held
        windows = calibration_windows(tiny_tokenizer, TextSource(src, "calib"), 40, 64, seed=1)
        scored = heldout_tokens(tiny_tokenizer, TextSource(src, "heldout"))
        scored_bytes = scored.to(torch.int32).numpy().tobytes()
        for w in windows:
            assert w.to(torch.int32).numpy().tobytes() not in scored_bytes, name
        everything = load_text(TextSource(src, "all"))
        assert calib.strip()[:100] in everything and held.strip()[-100:] in everything


def test_unknown_split_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 100)
    with pytest.raises(KvtoolError, match="unknown split 'validation'"):
        load_text(TextSource(str(tmp_path / "a.txt"), "validation"))
