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
    text = load_text(TextSource(str(tmp_path), text_field="body"))
    assert "plain text here" in text and "record 2" in text
    with pytest.raises(KvtoolError, match="no field 'text'"):
        load_text(TextSource(str(tmp_path / "b.jsonl")))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(KvtoolError, match="does not exist"):
        load_text(TextSource(str(tmp_path / "nope.txt")))
