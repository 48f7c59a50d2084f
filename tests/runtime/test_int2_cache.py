"""Int2Cache: model.generate with a 2-bit KV cache equals the fake-quant emulation of the same decode."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.errors import KvtoolError
from kvtool.runtime import Int2Cache
from kvtool.runtime.kvquant import KVQuantSpec, kv_quantization

G, D, LAYERS = 2, 16, 3


def _orth(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    return q


def _spec(window: int, sink: int, quantile: float | None) -> KVQuantSpec:
    spec = KVQuantSpec(method="oscar", bits=2, group_size=8, sink=sink, residual_window=window, k_quantile=quantile,
                       v_quantile=quantile)
    for i in range(LAYERS):
        spec.k_rotation[i] = torch.stack([_orth(i * 10 + g) for g in range(G)])
        spec.v_rotation[i] = torch.stack([_orth(100 + i * 10 + g) for g in range(G)])
        spec.k_clip[i], spec.v_clip[i] = torch.tensor([0.9, 1.0]), torch.tensor([1.0, 0.8])
    return spec


@pytest.mark.parametrize("window,sink,quantile", [(3, 2, 0.9), (0, 1, None), (5, 0, None)])
def test_generate_with_int2_cache_equals_the_emulated_decode(window, sink, quantile):
    model = tiny_model("llama", seed=4, head_dim=D).eval()
    spec = _spec(window, sink, quantile)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    cache = Int2Cache(spec, LAYERS)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = torch.cat(out.logits)  # [12, vocab]: the prompt's last position, then one per decode step
    seq = out.sequences
    with torch.no_grad(), kv_quantization(model, replace(spec, prefill=ids.shape[1])):
        emulated = model(input_ids=seq[:, :-1]).logits[0, ids.shape[1] - 1:]
    with torch.no_grad():
        exact = model(input_ids=seq[:, :-1]).logits[0, ids.shape[1] - 1:]
    gap = float((got - emulated).abs().max())
    assert gap < 1e-3, gap  # fp16 scales/zeros in the cache vs float32 in the emulation
    assert float((exact - emulated).abs().max()) > 20 * gap  # the 2-bit cache is really in the loop
    assert torch.equal(got.argmax(-1), seq[0, ids.shape[1]:])
    # bytes: every token outside the sink and the last window-1 is held as codes + fp16 scale/zero only
    n = seq.shape[1] - 1
    n_fp = min(sink, n) + max(window - 1, 0)
    per_token_int2 = 2 * G * (D // 4 + 2 * 2 * (D // 8))  # K and V: codes + fp16 scale and zero per group
    held = cache.nbytes()
    assert held["full_precision"] == n_fp * 2 * G * D * 4 * LAYERS
    assert held["int2"] == (n - n_fp) * per_token_int2 * LAYERS
    assert held["int2"] <= held["int2_allocated"] <= 2 * max(held["int2"], 16 * per_token_int2 * LAYERS)


def test_from_export_checks_the_model(tiny_checkpoint, tmp_path):
    from kvtool.cli import app
    from kvtool.models import load_model

    runner = CliRunner()
    model_dir = tiny_checkpoint("llama")
    res = runner.invoke(app, ["export", str(model_dir), "-o", str(tmp_path / "osc"), "--seq-len", "32",
                              "--kv-samples", "2", "--sink", "2", "--residual-window", "4", "--group-size", "8",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    loaded = load_model(str(model_dir))
    cache = Int2Cache.from_export(tmp_path / "osc", loaded)
    assert cache.spec.sink == 2 and cache.spec.residual_window == 4 and len(cache.layers) == loaded.spec.num_layers
    other = load_model(str(tiny_checkpoint("llama", seed=7)))
    with pytest.raises(KvtoolError, match="exported from other weights"):
        Int2Cache.from_export(tmp_path / "osc", other)
    with pytest.raises(KvtoolError, match="exported for a model with"):
        Int2Cache.from_export(tmp_path / "osc", tiny_model("llama", seed=4, head_dim=8))
    with pytest.raises(KvtoolError, match="no quantization_config.json"):
        Int2Cache.from_export(model_dir, loaded)
    cfg = json.loads((tmp_path / "osc" / "quantization_config.json").read_text())
    assert cfg["kv_cache_scheme"]["num_bits"] == 2
    # kvtool eval refuses an export made from other weights in one line
    res = runner.invoke(app, ["eval", str(tiny_checkpoint("llama", seed=7)), "--kv-quant", str(tmp_path / "osc"),
                              "--max-tokens", "64", "--seq-len", "32", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and "other weights" in res.output, \
        res.output


@pytest.mark.slow
def test_greedy_generation_on_the_embedded_model_matches_the_emulation(embedded, tmp_path):
    """SmolLM2 with an OSCAR export: 24 greedy tokens through Int2Cache equal the emulation's, token for token."""
    from kvtool.calib.collect import collect_statistics
    from kvtool.calib.kv_samples import collect_kv_samples
    from kvtool.convert.oscar import OscarOptions, oscar_transform
    from kvtool.data import TextSource, calibration_windows, heldout_tokens

    spec = embedded.spec
    windows = calibration_windows(embedded.tokenizer, TextSource("embedded"), 2, 128, 0, spec.max_positions)
    store = collect_statistics(embedded, windows, ("q", "k", "v"), progress=False)
    samples = collect_kv_samples(embedded.model, windows, sink=4)
    w_o = {i: layer.self_attn.o_proj.weight.detach() for i, layer in enumerate(spec.layers(embedded.model))}
    tensors, _ = oscar_transform(w_o, store, samples, spec, OscarOptions(rotation="released", clip="quantile"))
    q = KVQuantSpec(method="oscar", bits=2, group_size=spec.head_dim, sink=4, residual_window=8, k_quantile=0.96,
                    v_quantile=0.92)
    for i in range(spec.num_layers):
        for name in ("k_rotation", "v_rotation", "k_clip", "v_clip"):
            getattr(q, name)[i] = tensors[f"layers.{i}.{name}"]
    prompt = heldout_tokens(embedded.tokenizer, TextSource("embedded", "heldout"), 40)[None]
    out = embedded.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  past_key_values=Int2Cache(q, spec.num_layers), max_new_tokens=24, do_sample=False)
    emulated = prompt
    with torch.no_grad(), kv_quantization(embedded.model, replace(q, prefill=prompt.shape[1])):
        for _ in range(24):
            nxt = embedded.model(input_ids=emulated).logits[:, -1].argmax(-1, keepdim=True)
            emulated = torch.cat([emulated, nxt], dim=1)
    assert torch.equal(out, emulated)


def test_fused_decode_reads_the_packed_history_and_matches_the_reference_path():
    """Bound to the model with fused=True, decode steps run the fused INT2 kernel (Triton's interpreter here; the
    default on CUDA) over the paged codes plus the 16-bit sink/recent segment: the history is never dequantized,
    the logits follow the PyTorch reference path's and the greedy tokens are the same."""
    from kvtool.runtime.int2_cache import Int2Layer

    d = 64
    model = tiny_model("llama", seed=4, head_dim=d)
    spec = KVQuantSpec(method="oscar", bits=2, group_size=16, sink=2, residual_window=3)
    for i in range(LAYERS):
        spec.k_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(
            10 * i + g)))[0] for g in range(G)])
        spec.v_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(
            100 + 10 * i + g)))[0] for g in range(G)])
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    reference = model.generate(**kw, past_key_values=Int2Cache(spec, LAYERS, fused=False).bind(model))
    fused_cache = Int2Cache(spec, LAYERS, fused=True).bind(model)
    dequantized = []
    original = Int2Layer._quantized
    Int2Layer._quantized = lambda self: dequantized.append(self.length) or original(self)
    try:
        fused = model.generate(**kw, past_key_values=fused_cache)
    finally:
        Int2Layer._quantized = original
    assert len(dequantized) == LAYERS  # the prompt only: no decode step expanded the history
    assert fused_cache.layers[0].n_quantized > 0  # the decode read 2-bit tokens
    ref_logits, got = torch.cat(reference.logits), torch.cat(fused.logits)
    assert float((got - ref_logits).norm() / ref_logits.norm()) < 1e-2  # the kernel's fp16 operands
    assert torch.equal(fused.sequences, reference.sequences)


@pytest.mark.parametrize("sink,window,prompt", [(2, 3, 10), (4, 8, 5), (0, 5, 12)])
def test_static_int2_cache_decodes_like_the_dynamic_one(sink, window, prompt):
    """max_cache_len: fixed buffers and device-side bookkeeping (what a CUDA graph needs). The same codes (one
    reference packing), the same fused kernel: the logits of the dynamic fused cache and the same greedy tokens,
    through windows longer and shorter than the prompt and a cache without a sink."""
    d = 64
    model = tiny_model("llama", seed=4, head_dim=d)
    spec = KVQuantSpec(method="oscar", bits=2, group_size=16, sink=sink, residual_window=window, k_quantile=0.95)
    for i in range(LAYERS):
        spec.k_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(
            10 * i + g)))[0] for g in range(G)])
        spec.v_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(
            100 + 10 * i + g)))[0] for g in range(G)])
    ids = torch.randint(0, 300, (2, prompt), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(**kw, past_key_values=Int2Cache(spec, LAYERS, fused=True).bind(model))
    static_cache = Int2Cache(spec, LAYERS, max_cache_len=prompt + 20).bind(model)
    static = model.generate(**kw, past_key_values=static_cache)
    want, got = torch.cat(dynamic.logits), torch.cat(static.logits)
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert torch.equal(static.sequences, dynamic.sequences)
    layer = static_cache.layers[0]
    n = prompt + 13  # tokens cached after the last step
    assert int(layer.position) == n and layer.n_quantized == max(0, n - window - sink)
    assert int(layer.quantized_lens[0]) == layer.n_quantized


def test_static_int2_cache_refuses_what_it_cannot_hold():
    d = 64
    model = tiny_model("llama", seed=4, head_dim=d)
    spec = KVQuantSpec(method="oscar", bits=2, group_size=16, sink=2, residual_window=3)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(KvtoolError, match="holds 8 tokens"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                       past_key_values=Int2Cache(spec, LAYERS, max_cache_len=8).bind(model))
    small = tiny_model("llama", seed=4, head_dim=16)  # below the fused kernel's head_dim
    with pytest.raises(KvtoolError, match="drop max_cache_len"):
        small.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       past_key_values=Int2Cache(spec, LAYERS, max_cache_len=16).bind(small))
    with pytest.raises(KvtoolError, match="bind it first"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       past_key_values=Int2Cache(spec, LAYERS, max_cache_len=16))
