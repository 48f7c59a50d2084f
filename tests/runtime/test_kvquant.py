"""KV quantizer model and the prefill-style decode emulation, checked against a token-by-token decode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.cli import app
from kvtool.runtime.kvquant import (
    KVQuantSpec,
    fake_quantize,
    fake_quantize_per_channel,
    hadamard,
    kv_quantization,
    quantize_groups,
    quantized_mask,
    resolve_kv_quant,
)


def test_quantizer_levels_error_bound_and_clip():
    torch.manual_seed(0)
    x = torch.randn(50, 2, 16, dtype=torch.float64)
    for bits in (2, 4):
        codes, scale, zero = quantize_groups(x, bits, 8)
        assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
        xh = fake_quantize(x, bits, 8)
        err = (xh - x).reshape(50, 2, 2, 8).abs().amax(-1)
        fp16 = (zero.abs() + (2 ** bits - 1) * scale) * 2.0 ** -11  # scale and zero are stored in fp16
        assert torch.all(err <= scale / 2 + fp16 + 1e-12)  # no clipping: error at most half a step
        assert xh.reshape(50, 2, 2, 8)[0, 0, 0].unique().numel() <= 2 ** bits
    assert (fake_quantize(x, 4, 8) - x).pow(2).mean() < (fake_quantize(x, 2, 8) - x).pow(2).mean() / 4
    # clip 0.5 shrinks the range around the midpoint: extremes saturate at mid ± half/2
    xc = fake_quantize(x, 2, 16, 0.5)
    lo, hi = x.amin(-1), x.amax(-1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    assert torch.allclose(xc.amax(-1), mid + half / 2, atol=2e-3) and torch.allclose(xc.amin(-1), mid - half / 2,
                                                                                       atol=2e-3)


def test_quantized_mask_windows_and_kivi_chunks():
    pos = torch.arange(8)
    m = quantized_mask(pos, pos, window=2, sink=1)
    for i in range(8):
        for j in range(8):
            assert bool(m[i, j]) == (j >= 1 and i - j >= 2)
    mk = quantized_mask(pos, pos, window=0, sink=1, chunk=3)  # chunks [1,4), [4,7), [7,10)
    assert mk[3].tolist() == [False, True, True, True, False, False, False, False]
    assert mk[5].tolist() == [False, True, True, True, False, False, False, False]
    assert mk[6, 4:7].all() and not mk[7, 7]


def test_kivi_per_channel_chunks():
    torch.manual_seed(1)
    k = torch.randn(1, 2, 11, 8, dtype=torch.float64)
    out = fake_quantize_per_channel(k, 2, chunk=4, start=1)  # chunks [1,5), [5,9); 0 and 9,10 untouched
    assert torch.equal(out[:, :, 0], k[:, :, 0]) and torch.equal(out[:, :, 9:], k[:, :, 9:])
    for c0 in (1, 5):
        for ch in range(8):
            assert out[0, 0, c0:c0 + 4, ch].unique().numel() <= 4
    assert not torch.equal(out[:, :, 1:9], k[:, :, 1:9])


def test_hadamard_orthonormal():
    for d in (16, 64, 12):
        h = hadamard(d, seed=3)
        assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_exact_when_nothing_quantized(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with kv_quantization(model, None):
            same = model(input_ids=ids).logits
        spec = resolve_kv_quant("int2", head_dim=16, num_layers=3, num_kv_heads=2, residual_window=64)
        with kv_quantization(model, spec):
            windowed = model(input_ids=ids).logits
        spec = resolve_kv_quant("int2", head_dim=16, num_layers=3, num_kv_heads=2)
        with kv_quantization(model, spec):
            quant = model(input_ids=ids).logits
    assert torch.allclose(ref, same, atol=1e-5) and torch.allclose(ref, windowed, atol=1e-5)
    assert (ref - quant).abs().max() > 1e-2
    assert model.config._attn_implementation != "kvtool_kvquant"  # restored


# ------------------------------------------------------------------ token-by-token decode reference

class _DecodeReference:
    """A stateful quantized cache: each position is quantized once (per token when it arrives; KIVI key chunks
    when complete) and read quantized by every later query outside the sink/recent window."""

    def __init__(self, spec: KVQuantSpec):
        self.spec = spec
        self.k_hat: dict[int, dict[int, torch.Tensor]] = {}
        self.v_hat: dict[int, dict[int, torch.Tensor]] = {}

    def _per_token(self, x: torch.Tensor, rot: torch.Tensor | None, clip: torch.Tensor | None) -> torch.Tensor:
        # x [G, d] one token
        y = x if rot is None else torch.einsum("ged,gd->ge", rot, x)
        c = 1.0 if clip is None else clip[:, None]
        yq = fake_quantize(y, self.spec.bits, self.spec.group_size, c)
        return yq if rot is None else torch.einsum("ged,ge->gd", rot, yq)

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        sp, layer = self.spec, module.layer_idx
        kh, vh = self.k_hat.setdefault(layer, {}), self.v_hat.setdefault(layer, {})
        key, value, q = key[0].float(), value[0].float(), query[0, :, -1].float()  # [G, S, d], [H, d]
        s = key.shape[1]
        i = s - 1
        for j in range(len(vh), s):  # newly arrived positions
            vh[j] = self._per_token(value[:, j], sp.v_rotation.get(layer), sp.v_clip.get(layer))
            if sp.key_granularity == "per-token":
                kh[j] = self._per_token(key[:, j], sp.k_rotation.get(layer), sp.k_clip.get(layer))
        if sp.key_granularity == "per-channel":
            c = sp.group_size
            while sp.sink + (len(kh) // c + 1) * c <= s:  # next key chunk complete: quantize each channel over it
                a = sp.sink + len(kh)
                chunk = key[:, a:a + c]  # [G, c, d]
                q_chunk = fake_quantize(chunk.transpose(1, 2), sp.bits, c).transpose(1, 2)
                for t in range(c):
                    kh[len(kh)] = q_chunk[:, t]
        keys, vals = key.clone(), value.clone()
        for j in range(s):
            if j >= sp.sink and i - j >= sp.residual_window:
                vals[:, j] = vh[j]
                if sp.key_granularity == "per-token" or j - sp.sink < len(kh):
                    keys[:, j] = kh[j - sp.sink if sp.key_granularity == "per-channel" else j]
        g, d = keys.shape[0], keys.shape[-1]
        rep = q.shape[0] // g
        qg = q.reshape(g, rep, d)
        p = torch.softmax(torch.einsum("grd,gsd->grs", qg, keys) * (scaling or d ** -0.5), dim=-1)
        out = torch.einsum("grs,gsd->grd", p, vals).reshape(1, 1, -1, d)
        return out.to(query.dtype), None


def _decode_logits(model, ids: torch.Tensor, spec: KVQuantSpec) -> torch.Tensor:
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    ref = _DecodeReference(spec)
    AttentionInterface.register("kvtool_test_decode", ref.attention)
    AttentionMaskInterface.register("kvtool_test_decode", sdpa_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation_internal = "kvtool_test_decode"
    try:
        cache = DynamicCache(config=model.config)
        logits = []
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
    finally:
        model.config._attn_implementation_internal = previous
    return torch.stack(logits, dim=1)


def _random_oscar_like(num_layers: int, g: int, d: int) -> KVQuantSpec:
    gen = torch.Generator().manual_seed(5)
    spec = KVQuantSpec(method="oscar", bits=2, group_size=8)
    for i in range(num_layers):
        spec.k_rotation[i] = torch.linalg.qr(torch.randn(g, d, d, generator=gen))[0]
        spec.v_rotation[i] = torch.linalg.qr(torch.randn(g, d, d, generator=gen))[0]
        spec.k_clip[i] = torch.tensor([0.7, 0.9])
        spec.v_clip[i] = torch.tensor([0.8, 1.0])
    return spec


@pytest.mark.parametrize("method,sink,window", [("int2", 1, 3), ("hadamard-int2", 0, 0), ("kivi-int2", 2, 1),
                                                ("kivi-int2", 0, 9), ("int4", 0, 2), ("oscar", 1, 2)])
def test_prefill_emulation_matches_token_by_token_decode(method, sink, window):
    model = tiny_model("llama", seed=2)
    ids = torch.randint(0, 300, (1, 26), generator=torch.Generator().manual_seed(3))
    if method == "oscar":
        spec = _random_oscar_like(3, 2, 16)
        spec.sink, spec.residual_window = sink, window
    else:
        spec = resolve_kv_quant(method, head_dim=16, num_layers=3, num_kv_heads=2, group_size=8,
                                residual_window=window, sink=sink)
    with torch.no_grad():
        with kv_quantization(model, spec):
            prefill = model(input_ids=ids).logits
        decode = _decode_logits(model, ids, spec)
        exact = model(input_ids=ids).logits
    assert (prefill - exact).abs().max() > 1e-3  # the quantizer is really in the path
    torch.testing.assert_close(prefill, decode, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------ CLI

runner = CliRunner()


def test_eval_kv_quant_cli(tiny_checkpoint):
    model = tiny_checkpoint("llama")
    base = ["eval", str(model), "--max-tokens", "300", "--seq-len", "64", "--device", "cpu", "--json"]
    fp = json.loads(runner.invoke(app, base).output)
    res = runner.invoke(app, base + ["--kv-quant", "int2", "--group-size", "8", "--sink", "1"])
    assert res.exit_code == 0, res.output
    q = json.loads(res.output)
    assert q["kv_quant"]["method"] == "int2" and q["kv_quant"]["sink"] == 1 and q["kv_quant"]["group_size"] == 8
    assert q["kv_bits_per_element"] == 2 + 32 / 8
    q4 = json.loads(runner.invoke(app, base + ["--kv-quant", "int4", "--group-size", "8", "--sink", "1"]).output)
    assert q["tokens_scored"] == fp["tokens_scored"] == q4["tokens_scored"]
    # the quantization error shows in the score and shrinks with more bits
    gap2, gap4 = abs(math.log(q["perplexity"] / fp["perplexity"])), abs(math.log(q4["perplexity"] / fp["perplexity"]))
    assert gap2 > 1e-4 and gap4 < 0.5 * gap2, (fp, q, q4)
    for extra, fragment in ((["--kv-quant", "int3"], "neither a method"),
                            (["--kv-quant", "int2", "--group-size", "5"], "does not divide head_dim"),
                            (["--kv-quant", "int2", "--sink", "-1"], "must be >= 0")):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 2 and res.output.strip().startswith("error:") and fragment in res.output, res.output
