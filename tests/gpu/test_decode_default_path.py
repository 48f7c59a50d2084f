"""On a CUDA device the default decode path of kvtool MLA checkpoints is the Triton kernels over the latent cache:
cached decode matches the full forward and greedy ``generate`` gives the PyTorch path's tokens (skipped without a
GPU; run on the device machine before each claim)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mla_model(rope: str, ratio: float = 0.5):
    from transformers import LlamaConfig

    import kvtool  # noqa: F401
    from kvtool.runtime.mla import MLA_MODELS, mla_config

    g, d, layers = 4, 128, 4
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, vocab_size=1000, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=g, head_dim=d, max_position_embeddings=4096)
    width = int(ratio * 2 * g * d)
    rope_dim = 64 if rope == "decoupled" else 0
    r_k = (width - rope_dim) // 2
    pairs = [list(range(0, d // 2, 2))[: rope_dim // 2]] * layers
    mcfg = mla_config(cfg, [(r_k, width - rope_dim - r_k)] * layers, rope, rope_dim, pairs)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLA_MODELS["llama"](mcfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def assert_same_tokens_both_paths(model, prompt):
    """Greedy generate through the default path (the kernels on CUDA) and the PyTorch path: the same tokens."""
    from kvtool.runtime.mla import set_decode_kernel

    tokens = {}
    for use in (None, False):
        set_decode_kernel(model, use)
        tokens[use] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    set_decode_kernel(model, None)
    assert torch.equal(tokens[None], tokens[False])


@pytest.mark.parametrize("rope", ["keep", "decoupled"])
def test_default_path_is_the_kernel_and_decodes_like_the_full_forward(rope):
    from kvtool.runtime.decode_check import check_cached_decode
    from kvtool.runtime.mla import MlaAttention

    model = mla_model(rope)
    calls = []
    for m in model.modules():
        if isinstance(m, MlaAttention):
            assert m.use_kernel is None and m.kernel_supported
            original = m._kernel_decode
            m._kernel_decode = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    # Triton's dots take float32 operands as TF32 (10-bit mantissa): bound 1e-3 relative
    report = check_cached_decode(model, ids, prefill=24, tolerance=1e-3)
    assert calls, "the default decode step did not go through the kernels"
    assert report["passed"], report
    assert_same_tokens_both_paths(model, ids[:, :24])


def assert_graph_step_matches_eager(model):
    """StaticCache + the default kernel path: a decode step captured in a CUDA graph and replayed gives the eager
    step's logits, and the eager step the full forward's (the kernels read each row's valid length on the device)."""
    from transformers import StaticCache

    from kvtool.runtime.graphs import capture_graph
    from kvtool.runtime.hf_cache import cache_kwarg

    ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    kw = lambda c: {cache_kwarg(): c}  # noqa: E731
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1].float()
        cache = StaticCache(config=model.config, max_cache_len=64)
        model(input_ids=ids[:, :39], use_cache=True, **kw(cache))
        step_ids, pos = ids[:, 39:40].clone(), torch.full((2, 1), 39, device="cuda")
        counts = [layer.cumulative_length.clone() for layer in cache.layers]

        def step():
            for layer, n in zip(cache.layers, counts, strict=True):
                layer.cumulative_length.copy_(n)
            return model(input_ids=step_ids, position_ids=pos, use_cache=True, **kw(cache)).logits

        eager = step()[:, -1].float()
        graph, out = capture_graph(step)
        graph.replay()
        torch.cuda.synchronize()
    assert ((eager - full).norm() / full.norm()) < 1e-3
    assert ((out[:, -1].float() - eager).norm() / eager.norm()) < 1e-5


@pytest.mark.parametrize("rope", ["keep", "decoupled"])
def test_static_cache_decode_step_captures_in_a_cuda_graph(rope):
    assert_graph_step_matches_eager(mla_model(rope))


def deepseek_model():
    """A DeepSeek-V3 model (the export's layout: q_lora none, nope 128 + rope 64, v 128) run by kvtool's latent
    runtime, random float32 weights on the GPU."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from kvtool.runtime.deepseek import use_latent_attention

    cfg = DeepseekV3Config(vocab_size=1000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                           first_k_dense_replace=4, kv_lora_rank=448, q_lora_rank=None, qk_rope_head_dim=64,
                           qk_nope_head_dim=128, v_head_dim=128, head_dim=64, rope_interleave=True,
                           max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    assert use_latent_attention(model) == 4
    return model


def test_deepseek_default_path_is_the_shared_latent_kernel():
    from kvtool.runtime.decode_check import check_cached_decode
    from kvtool.runtime.deepseek import LatentAttention

    model = deepseek_model()
    calls = []
    import kvtool.kernels.mla_decode as mla_decode

    original = mla_decode.mla_decode_shared
    mla_decode.mla_decode_shared = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        assert all(m.use_kernel is None for m in model.modules() if isinstance(m, LatentAttention))
        ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        report = check_cached_decode(model, ids, prefill=24, tolerance=1e-3)  # TF32 dots in the kernel
        assert calls, "the default decode step did not go through the shared-latent kernel"
        assert report["passed"], report
        assert_same_tokens_both_paths(model, ids[:, :24])
    finally:
        mla_decode.mla_decode_shared = original


def test_deepseek_static_cache_step_captures_in_a_cuda_graph():
    assert_graph_step_matches_eager(deepseek_model())


@pytest.mark.parametrize("which", ["mla-decoupled", "deepseek"])
def test_generate_with_a_static_cache_gives_the_dynamic_caches_tokens(which):
    """`generate(cache_implementation="static")` on CUDA: transformers compiles the forward
    (torch.compile, mode reduce-overhead: CUDA graphs) around kvtool's kernels; the tokens must be the dynamic
    cache's."""
    model = mla_model("decoupled") if which == "mla-decoupled" else deepseek_model()
    ids = torch.randint(0, 1000, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
              min_new_tokens=16, pad_token_id=0)
    dynamic = model.generate(**kw)
    static = model.generate(**kw, cache_implementation="static")
    assert torch.equal(static, dynamic)
