"""On a CUDA device a bound Int2Cache decodes through the fused INT2 kernel by default (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_and_spec():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvtool.runtime.kvquant import KVQuantSpec

    g, d, layers = 2, 128, 3
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, vocab_size=1000, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=g, head_dim=d, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    spec = KVQuantSpec(method="oscar", bits=2, group_size=128, sink=4, residual_window=16)
    gen = torch.Generator().manual_seed(3)
    for i in range(layers):
        spec.k_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for _ in range(g)])
        spec.v_rotation[i] = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for _ in range(g)])
    return model, spec, layers


def test_fused_is_the_default_on_cuda_and_follows_the_reference_path():
    from kvtool.runtime import Int2Cache

    model, spec, layers = model_and_spec()
    ids = torch.randint(0, 1000, (2, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    reference = model.generate(**kw, past_key_values=Int2Cache(spec, layers, fused=False).bind(model))
    default = Int2Cache(spec, layers).bind(model)
    fused = model.generate(**kw, past_key_values=default)
    layer = default.layers[0]
    assert layer.fused and layer.n_quantized > 150  # the default on CUDA, over a real 2-bit history
    ref, got = torch.cat(reference.logits), torch.cat(fused.logits)
    assert float((got - ref).norm() / ref.norm()) < 1e-2, float((got - ref).norm() / ref.norm())
    agree = (fused.sequences == reference.sequences).float().mean().item()
    assert agree >= 0.95, agree


def test_static_int2_cache_step_captures_in_a_cuda_graph():
    """max_cache_len: the decode step (pack the token leaving the window, file the new one, fused attention) is
    captured in a CUDA graph; replays give the eager step's logits, and generate gives the dynamic cache's tokens."""
    from kvtool.runtime import Int2Cache
    from kvtool.runtime.graphs import capture_graph
    from kvtool.runtime.hf_cache import cache_kwarg

    model, spec, layers = model_and_spec()
    ids = torch.randint(0, 1000, (2, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(**kw, **{cache_kwarg(): Int2Cache(spec, layers).bind(model)})
    static = model.generate(**kw, **{cache_kwarg(): Int2Cache(spec, layers, max_cache_len=256).bind(model)})
    assert torch.equal(static.sequences, dynamic.sequences)
    want, got = torch.cat(dynamic.logits), torch.cat(static.logits)
    assert float((got - want).norm() / want.norm()) < 1e-3
    cache = Int2Cache(spec, layers, max_cache_len=256).bind(model)
    with torch.no_grad():
        model(input_ids=ids[:, :199], use_cache=True, **{cache_kwarg(): cache})
        step_ids, pos = ids[:, 199:].clone(), torch.full((2, 1), 199, device="cuda")

        def step():
            for layer in cache.layers:
                layer.set_length(199)
            return model(input_ids=step_ids, position_ids=pos, use_cache=True, **{cache_kwarg(): cache}).logits

        eager = step()[:, -1].float()
        graph, out = capture_graph(step)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    assert ((out[:, -1].float() - eager).norm() / eager.norm()) < 1e-5


@pytest.mark.parametrize("unpack", ["asm", "asm-folded"])
@pytest.mark.parametrize("gs", [128, 32])
def test_int2_kernel_unpack_modes_match_the_reference(unpack, gs):
    """The PTX unpack paths (plain, and with the 1024 bias folded into the zero term) against the PyTorch reference
    at Llama-8B head shapes on the GPU (the interpreter runs only the convert paths)."""
    from kvtool.kernels.int2_kv import (
        decode_attention_reference,
        int2_decode_attention,
        new_paged_cache,
        quantize_pack,
    )

    g, h, d, block, n = 8, 32, 128, 16, 3000
    gen = torch.Generator(device="cuda").manual_seed(5)
    blocks = -(-n // block)
    kc, vc = (new_paged_cache(2 * blocks, g, block, d, gs, device="cuda") for _ in range(2))
    table = torch.stack([torch.arange(blocks), torch.arange(blocks, 2 * blocks)]).int().cuda()
    for b in range(2):
        slots = (table[b, torch.arange(n, device="cuda") // block].long() * block
                 + torch.arange(n, device="cuda") % block)
        for cache in (kc, vc):
            quantize_pack(torch.randn(n, g, d, device="cuda", generator=gen) + 3.0, None, None, slots, cache)
    q = torch.randn(2, h, d, device="cuda", generator=gen)
    lens = torch.tensor([n, n // 3], device="cuda", dtype=torch.int32)
    out = int2_decode_attention(q, kc, vc, table, lens, unpack=unpack)
    ref = decode_attention_reference(q, kc, vc, table, lens)
    assert float((out - ref).norm() / ref.norm()) < 3e-3
