"""On a CUDA device a bound Int2Cache decodes through the fused INT2 kernel by default (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fused_is_the_default_on_cuda_and_follows_the_reference_path():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvtool.runtime import Int2Cache
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
