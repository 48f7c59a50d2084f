"""Cached decode equals the full forward for every model class kvtool registers or writes.

Each output is written by the CLI (as a user gets it), loaded with stock ``AutoModelForCausalLM`` and decoded step by
step with a cache; every step's logits must match the uncached forward (1e-4 relative, float32) and greedy
``generate`` must give the full forward's argmax for 16 tokens. The original model with ``Int2Cache`` is compared
with its own emulation (the full forward through the fake-quant attention)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.cli import app
from kvtool.runtime.decode_check import check_cached_decode
from kvtool.runtime.hf_cache import cache_kwarg, take_cache

runner = CliRunner()


def ids(b=2, n=24, seed=3):
    return torch.randint(0, 300, (b, n), generator=torch.Generator().manual_seed(seed))


def load(path):
    from transformers import AutoModelForCausalLM

    import kvtool  # noqa: F401  (registers kvtool's classes)

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def assert_decodes(model, **kw):
    report = check_cached_decode(model, ids(), prefill=10, **kw)
    assert report["cached_vs_full_max_rel_err"] <= 1e-4, report
    assert report["generate_vs_full_argmax_agreement"] == 1.0, report
    assert report["generated_tokens"] >= 16 and report["passed"], report
    return report


def convert(args, tmp_path, name):
    res = runner.invoke(app, [str(a) for a in args] + ["-o", str(tmp_path / name), "--device", "cpu", "--samples",
                                                        "2", "--seq-len", "32", "--no-progress"])
    assert res.exit_code == 0, res.output
    return tmp_path / name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("rope", ["keep", "decoupled"])
def test_kvtool_mla_cached_decode_equals_full_forward(tiny_checkpoint, tmp_path, arch, rope):
    src = tiny_checkpoint(arch)
    if arch == "qwen3" and rope == "decoupled":
        pytest.skip("decoupled RoPE is not offered for q/k-norm models")
    out = convert(["convert-mla", src, "--rope", rope, "--kv-ratio", 0.5], tmp_path, "mla")
    model = load(out)
    assert type(model).__name__.startswith("KvtoolMla")
    assert_decodes(model)


def test_deepseek_v3_export_cached_decode_equals_full_forward(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    out = convert(["convert-mla", src, "--format", "deepseek-v3", "--kv-ratio", 0.5], tmp_path, "ds")
    model = load(out)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert_decodes(model)


@pytest.mark.parametrize("q_lora", ["none", "identity"])
def test_deepseek_v3_latent_runtime_decodes_like_stock(tiny_checkpoint, tmp_path, q_lora):
    # kvtool's latent runtime on the export: the same parameters (state dict unchanged), cached decode equal to the
    # full forward through the PyTorch path and through the shared-latent kernel (Triton interpreter), and the same
    # greedy tokens as stock transformers
    from kvtool.runtime.deepseek import LatentAttention, use_latent_attention
    from kvtool.runtime.mla import set_decode_kernel

    src = tiny_checkpoint("llama")
    out = convert(["convert-mla", src, "--format", "deepseek-v3", "--kv-ratio", 0.5, "--q-lora", q_lora], tmp_path,
                  "ds")
    stock, model = load(out), load(out)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_latent_attention(model) == model.config.num_hidden_layers
    assert all(isinstance(layer.self_attn, LatentAttention) for layer in model.model.layers)
    assert model.state_dict().keys() == keys.keys()
    prompt = ids(1, 10)
    with torch.no_grad():
        want = stock.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for use in (False, True):
        set_decode_kernel(model, use)
        report = assert_decodes(model)
        with torch.no_grad():
            got = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want), (use, report)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ladder_cached_decode_equals_full_forward(tiny_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(arch)
    out = convert(["ladder", src, "--layers", "1-"], tmp_path, "lad")
    model = load(out)
    assert type(model).__name__.startswith("Ladder") and model.config.ladder_layers == [1, 2]
    assert_decodes(model)


def test_int2_cache_decode_equals_its_emulation():
    from test_int2_cache import LAYERS, _spec

    from kvtool.runtime import Int2Cache
    from kvtool.runtime.kvquant import kv_quantization

    model = tiny_model("llama", seed=4, head_dim=16)
    spec = _spec(3, 2, 0.9)
    emulate = lambda: kv_quantization(model, replace(spec, prefill=10))  # noqa: E731
    report = assert_decodes(model, new_cache=lambda: Int2Cache(spec, LAYERS), reference=emulate)
    # the 2-bit cache is in the loop: against the exact forward the same decode is far off
    exact = check_cached_decode(model, ids(), prefill=10, new_cache=lambda: Int2Cache(spec, LAYERS))
    assert exact["cached_vs_full_max_rel_err"] > 100 * max(report["cached_vs_full_max_rel_err"], 1e-7)


def test_the_check_fails_when_a_layer_ignores_its_cache(tiny_checkpoint, tmp_path):
    """The failure the check exists for: attention that drops the cache argument (what transformers 5.25's
    ``cache=`` did to kvtool's MLA layer) decodes each step against its own token only."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        forward = layer.self_attn.forward

        def no_cache(*args, _f=forward, **kwargs):
            take_cache(kwargs)
            return _f(*args, **kwargs)
        layer.self_attn.forward = no_cache
    report = check_cached_decode(model, ids(), prefill=10)
    assert not report["passed"] and report["cached_vs_full_max_rel_err"] > 1e-2


def test_both_cache_spellings_reach_kvtool_layers(tiny_checkpoint, tmp_path):
    from transformers import DynamicCache

    model = load(convert(["convert-mla", tiny_checkpoint("llama"), "--rope", "decoupled"], tmp_path, "m"))
    x = ids(1, 12)
    attn, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config)
            model(input_ids=x[:, :-1], use_cache=True, **{cache_kwarg(): cache})
            assert cache.get_seq_length(0) == 11
            h = model.model.embed_tokens(x[:, -1:])
            attn(norm(h), model.model.rotary_emb(h, torch.tensor([[11]])), attention_mask=None, **{name: cache})
            assert cache.get_seq_length(0) == 12, f"{name}= did not reach the layer's cache"


@pytest.mark.parametrize("rope", ["keep", "decoupled"])
def test_generate_through_the_decode_kernels_gives_the_reference_tokens(tiny_checkpoint, tmp_path, rope):
    """The fast path (Triton decode kernels over the latent cache, the default on CUDA) and the PyTorch reference
    path: same cached logits to 1e-4, same greedy tokens (Triton's interpreter on the CPU)."""
    from kvtool.runtime.mla import MlaAttention, set_decode_kernel

    src = tiny_checkpoint("llama", head_dim=32)
    model = load(convert(["convert-mla", src, "--rope", rope, "--kv-ratio", 0.5], tmp_path, "mla"))
    layers = [m for m in model.modules() if isinstance(m, MlaAttention)]
    assert all(m.use_kernel is None and m.kernel_supported for m in layers)  # the default: kernels on CUDA
    x = ids(1, 14)
    tokens = {}
    for use in (False, True):
        set_decode_kernel(model, use)
        report = check_cached_decode(model, x, prefill=8, new_tokens=6)
        assert report["passed"], (use, report)
        tokens[use] = model.generate(input_ids=x[:, :8], attention_mask=torch.ones_like(x[:, :8]), do_sample=False,
                                     max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(tokens[True], tokens[False])


@pytest.mark.parametrize("rope", ["keep", "decoupled"])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_static_cache_decode_equals_full_forward(tiny_checkpoint, tmp_path, rope, use_kernel):
    """A static-shape cache (transformers' StaticCache: fixed slots, what CUDA graphs need) holds the latent; the
    kernels read each row's valid length on the device."""
    from transformers import StaticCache

    from kvtool.runtime.mla import set_decode_kernel

    src = tiny_checkpoint("llama", head_dim=32)
    model = load(convert(["convert-mla", src, "--rope", rope, "--kv-ratio", 0.5], tmp_path, "mla"))
    set_decode_kernel(model, use_kernel)
    report = check_cached_decode(model, ids(2, 14), prefill=8, new_tokens=6,
                                 new_cache=lambda: StaticCache(config=model.config, max_cache_len=40))
    assert report["passed"], report


@pytest.mark.parametrize("use_kernel", [False, True])
def test_deepseek_latent_runtime_static_cache(tiny_checkpoint, tmp_path, use_kernel):
    """The DeepSeek-V3 export through kvtool's latent runtime over a StaticCache: the shared-latent kernel reads each
    row's valid length on the device (CUDA-graph capture needs it)."""
    from transformers import StaticCache

    from kvtool.runtime.deepseek import use_latent_attention
    from kvtool.runtime.mla import set_decode_kernel

    model = load(convert(["convert-mla", tiny_checkpoint("llama"), "--format", "deepseek-v3", "--kv-ratio", 0.5],
                         tmp_path, "ds"))
    use_latent_attention(model)
    set_decode_kernel(model, use_kernel)
    report = check_cached_decode(model, ids(2, 14), prefill=8, new_tokens=6,
                                 new_cache=lambda: StaticCache(config=model.config, max_cache_len=40))
    assert report["passed"], report
