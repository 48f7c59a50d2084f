"""The embedded SmolLM2-135M-Instruct: loads, gives a finite held-out perplexity, calibrates a few layers."""

from __future__ import annotations

import math

import pytest
import torch

from kvtool.calib.collect import collect_statistics
from kvtool.data import TextSource, calibration_windows, heldout_tokens
from kvtool.evaluate import perplexity

pytestmark = pytest.mark.slow


def test_embedded_model_spec(embedded):
    spec = embedded.spec
    shape = (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    assert shape == ("llama", 30, 9, 3, 64)
    assert embedded.model_hash.startswith("sha256:")


def test_embedded_heldout_perplexity_is_finite_and_sane(embedded):
    tokens = heldout_tokens(embedded.tokenizer, TextSource(split="heldout"), 1024)
    res = perplexity(embedded.model, tokens, seq_len=256)
    assert math.isfinite(res["perplexity"]) and 2 < res["perplexity"] < 60, res


def test_embedded_calibrates_a_few_layers(embedded):
    ids = calibration_windows(embedded.tokenizer, TextSource(), samples=2, seq_len=64, seed=0)
    store = collect_statistics(embedded, ids, "attn_in,k,v", layers=[0, 1, 2])
    assert store.layers() == [0, 1, 2]
    c = store.second_moment(2, "attn_in")
    assert c.shape == (576, 576) and torch.isfinite(c).all()
    assert torch.linalg.eigvalsh(c).min() > -1e-8  # a second moment is positive semi-definite
    assert store.sum(1, "k").shape == (3, 64, 64)
