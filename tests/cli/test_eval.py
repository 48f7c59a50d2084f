"""Perplexity against a direct computation, in both window modes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kvtool.errors import KvtoolError
from kvtool.evaluate import perplexity


@torch.no_grad()
def direct_nll(model, tokens, start, end, first):
    ids = tokens[start:end][None]
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return [-logp[t - 1, ids[0, t]].item() for t in range(first, end - start)]


def test_non_overlapping_matches_direct():
    model = tiny_model("llama")
    tokens = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, tokens, seq_len=32, batch_size=2)
    nll = [*direct_nll(model, tokens, 0, 32, 1), *direct_nll(model, tokens, 32, 64, 1),
           *direct_nll(model, tokens, 64, 70, 1)]
    assert res["tokens_scored"] == len(nll) == 31 + 31 + 5
    assert res["mode"] == "non-overlapping"
    assert math.isclose(res["perplexity"], math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_sliding_scores_each_token_once_with_context():
    model = tiny_model("llama")
    tokens = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, tokens, seq_len=32, stride=16)
    nll = [*direct_nll(model, tokens, 0, 32, 1), *direct_nll(model, tokens, 16, 48, 16),
           *direct_nll(model, tokens, 32, 50, 16)]
    assert res["tokens_scored"] == 49 == len(nll)
    assert math.isclose(res["perplexity"], math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_bad_stride():
    with pytest.raises(KvtoolError, match="stride"):
        perplexity(tiny_model("llama"), torch.arange(40), seq_len=16, stride=32)
