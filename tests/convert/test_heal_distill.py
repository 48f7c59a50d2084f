"""End-to-end distillation (``kvtool heal --e2e-steps``): the teacher cache changes no number, and KL falls."""

import torch
from conftest import tiny_model

from kvtool.convert import heal


def _run(monkeypatch, cache_bytes):
    monkeypatch.setattr(heal, "TEACHER_CACHE_BYTES", cache_bytes)
    teacher = tiny_model("llama", seed=0).eval()
    student = tiny_model("llama", seed=1)
    calls = []

    def teacher_logits(ids):
        calls.append(1)
        return teacher(input_ids=ids, use_cache=False).logits

    windows = list(torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0)).split(2))
    params = [p for layer in student.model.layers for p in layer.self_attn.parameters()]
    curve = heal.distill(student, teacher_logits, windows, params, steps=6, lr=1e-3)
    return curve, len(calls)


def test_distill_teacher_cache_is_exact_and_kl_falls(monkeypatch):
    cached, cached_calls = _run(monkeypatch, 2 << 30)
    uncached, uncached_calls = _run(monkeypatch, 0)
    assert (cached_calls, uncached_calls) == (2, 6)  # each of the 2 batches once vs once per step
    assert cached == uncached
    assert cached[-1] < cached[0]
