"""Ladder residual: the recurrence, exactness with zero ladder layers, checkpoints, layer choice, drift, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

import kvtool  # noqa: F401  (registers the ladder classes)
from kvtool.calib.drift import layer_drift
from kvtool.cli import app
from kvtool.convert.ladder import check_ladder_supported, choose_least_drift, parse_layers
from kvtool.errors import KvtoolError
from kvtool.models import load_model, wrap_model
from kvtool.runtime.ladder import install_ladder, ladder_layers_of, remove_ladder

runner = CliRunner()


def module_reference(model, ids, ladder):
    """The paper's recurrence written out over modules j: x_{j+1} = x_j + f_j(x_{j-1} if ladder else x_j)."""
    m = model.model
    x = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = m.rotary_emb(x, position_ids=pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    xs = [x, x]  # xs[-2] = x_{j-1} (x_{-1} := x_0), xs[-1] = x_j
    for i, layer in enumerate(m.layers):
        for kind in ("attn", "mlp"):
            inp = xs[-2] if i in ladder else xs[-1]
            if kind == "attn":
                f, _ = layer.self_attn(hidden_states=layer.input_layernorm(inp), position_embeddings=rope,
                                       attention_mask=mask)
            else:
                f = layer.mlp(layer.post_attention_layernorm(inp))
            xs.append(xs[-1] + f)
    return model.lm_head(m.norm(xs[-1]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_recurrence_matches_paper_equation(arch):
    model = tiny_model(arch, seed=3, num_hidden_layers=4)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        for ladder in ([0], [1, 2], [3], [0, 1, 2, 3], [0, 2]):
            install_ladder(model, ladder)
            got = model(ids).logits
            torch.testing.assert_close(got, module_reference(model, ids, set(ladder)), rtol=1e-5, atol=1e-5)
            assert (got - base).abs().max() > 1e-3  # rewiring really changes the function
        remove_ladder(model)
        assert torch.equal(model(ids).logits, base)


def test_zero_ladder_layers_reproduce_logits_exactly(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("qwen3")
    res = runner.invoke(app, ["ladder", str(src), "-o", str(tmp_path / "l0"), "--layers", "none", "--samples", "2",
                              "--seq-len", "16", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    a = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "l0")).eval()
    assert type(b).__name__ == "LadderQwen3ForCausalLM" and b.config.ladder_layers == []
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_checkpoint_roundtrip_and_generation(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("llama")
    out = tmp_path / "lad"
    res = runner.invoke(app, ["ladder", str(src), "-o", str(out), "--layers", "1-", "--samples", "2",
                              "--seq-len", "16", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "kvtool_ladder_llama" and cfg["kvtool_source_model_type"] == "llama"
    assert cfg["ladder_layers"] == [1, 2] and cfg["hidden_size"] == 64 and cfg["num_key_value_heads"] == 2
    manifest = json.loads((out / "kvtool.json").read_text())
    assert manifest["command"] == "ladder" and manifest["report"]["ladder_layers"] == [1, 2]
    assert len(manifest["report"]["drift"]) == 3 and manifest["report"]["overlappable_allreduces"] == 4
    lad = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    for (k1, v1), (k2, v2) in zip(sorted(lad.state_dict().items()), sorted(ref.state_dict().items()), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)  # weights unchanged
    assert ladder_layers_of(lad) == [1, 2]
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        install_ladder(ref, [1, 2])
        assert torch.equal(lad(ids).logits, ref(ids).logits)
        gen = lad.generate(ids, max_new_tokens=6, do_sample=False)  # KV cache path
        full = lad(gen).logits  # no cache: every generated token is the argmax of the full forward
        assert torch.equal(full[0, 7:-1].argmax(-1), gen[0, 8:])
    loaded = load_model(str(out))
    assert loaded.spec.model_type == "llama" and loaded.spec.num_layers == 3


def test_validate_ladder_checkpoint(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    out = tmp_path / "lad"
    res = runner.invoke(app, ["ladder", str(src), "-o", str(out), "--layers", "auto", "--count", "2",
                              "--samples", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(out), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["passed"] and report["max_err_tp_triton_vs_hf"] < 1e-4


def test_parse_layers():
    assert parse_layers("16-").resolve(30) == list(range(16, 30))
    assert parse_layers("4-6").resolve(30) == [4, 5, 6]
    assert parse_layers("0-3,12").resolve(30) == [0, 1, 2, 3, 12]
    assert parse_layers("8").resolve(30) == [8]
    assert parse_layers("all").resolve(4) == [0, 1, 2, 3]
    assert parse_layers("none").resolve(30) == []
    assert parse_layers("50%").resolve(30) == list(range(15, 30))
    assert parse_layers("25%").resolve(30) == list(range(22, 30))  # 7.5 -> 8
    assert parse_layers("5,3,3").resolve(30) == [3, 5]
    drift = [{"layer": i, "drift": d} for i, d in enumerate([0.5, 0.1, 0.3, 0.1])]
    assert parse_layers("auto", 2).resolve(4, drift) == [1, 3]
    assert choose_least_drift(drift, 3) == [1, 2, 3]


@pytest.mark.parametrize("text,count,fragment", [
    ("16-40", None, "outside the model's 30 layers"), ("40-", None, "outside"), ("31", None, "outside"),
    ("3,31", None, "outside"), ("auto", None, "needs --count"), ("8", 3, "--count applies only"),
    ("top", None, "not understood"), ("5-2", None, "is empty"), ("150%", None, "0..100"),
    ("16:", None, "not understood"), ("auto", 31, "only 30 layers"),
])
def test_parse_layers_errors(text, count, fragment):
    with pytest.raises(KvtoolError, match=fragment):
        parse_layers(text, count).resolve(30, [{"layer": i, "drift": 0.0} for i in range(30)])


def test_drift_pass_matches_brute_force():
    """Drift of layer i from the layer-sequential pass = the change of layer i's output when only i is rewired."""
    model = tiny_model("llama", seed=7)
    loaded = wrap_model(model)
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(3))
    rows = layer_drift(loaded, ids, batch_size=2)
    assert rows[0]["attn_drift"] == 0.0  # layer 0's stale input is its own input
    for i in range(3):
        outs: list[torch.Tensor] = []
        for ladder in ([], [i]):
            install_ladder(model, ladder)
            h = model.model.layers[i].register_forward_hook(lambda m, a, o, outs=outs: outs.append(o))
            with torch.no_grad():
                model(ids)
            h.remove()
        remove_ladder(model)
        d = (outs[1] - outs[0]).double().pow(2).sum(-1) / outs[0].double().pow(2).sum(-1)
        assert rows[i]["drift"] == pytest.approx(d.mean().sqrt().item(), rel=1e-6)


def test_unsupported_architecture_and_already_ladder(tmp_path, tiny_checkpoint, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2,
                                                                 vocab_size=300))
    with pytest.raises(KvtoolError, match="not supported for architecture 'gpt2'"):
        check_ladder_supported(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    res = runner.invoke(app, ["ladder", str(tmp_path / "gpt2"), "-o", str(tmp_path / "x"), "--layers", "1-",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and "gpt2" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()

    src = tiny_checkpoint("llama")
    args = ["--samples", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"]
    assert runner.invoke(app, ["ladder", str(src), "-o", str(tmp_path / "l"), "--layers", "1", *args]).exit_code == 0
    res = runner.invoke(app, ["ladder", str(tmp_path / "l"), "-o", str(tmp_path / "ll"), "--layers", "1", *args])
    assert res.exit_code == 2 and "already a ladder checkpoint" in res.output and not (tmp_path / "ll").exists()
    res = runner.invoke(app, ["ladder", str(src), "-o", str(tmp_path / "bad"), "--layers", "2-9", *args])
    assert res.exit_code == 2 and "outside the model's 3 layers" in res.output
    assert not (tmp_path / "bad").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_embedded_model_exact_and_recurrence(embedded):
    model = embedded.model
    ids = torch.tensor(embedded.tokenizer("def f(x):\n    return x + 1\n")["input_ids"])[None]
    with torch.no_grad():
        base = model(ids).logits
        install_ladder(model, [])
        assert torch.equal(model(ids).logits, base)
        install_ladder(model, range(15, 30))
        try:
            got = model(ids).logits
            torch.testing.assert_close(got, module_reference(model, ids, set(range(15, 30))), rtol=1e-4, atol=1e-4)
        finally:
            remove_ladder(model)
        assert torch.equal(model(ids).logits, base)


def test_write_ladder_from_streamed_model(tiny_checkpoint, tmp_path):
    """A lazily loaded model (layers streamed from disk) gives the same drift and checkpoint as a loaded one."""
    from kvtool.methods import run_method

    src = tiny_checkpoint("llama")
    from kvtool.options import DataOptions

    opts = dict(layers="auto", count=1, data=DataOptions(samples=2, seq_len=16, batch_size=4))
    eager = run_method("ladder", load_model(str(src)), None, tmp_path / "a", **opts)
    lazy = run_method("ladder", load_model(str(src), lazy=True), None, tmp_path / "b", **opts)
    assert eager["ladder_layers"] == lazy["ladder_layers"]
    for r1, r2 in zip(eager["drift"], lazy["drift"], strict=True):
        assert r1["drift"] == pytest.approx(r2["drift"], rel=1e-6)
    a, b = load_model(str(tmp_path / "a")).model, load_model(str(tmp_path / "b")).model
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_deepcopy_of_ladder_model_runs_independently():
    import copy

    model = install_ladder(tiny_model("llama", seed=4), [1, 2])
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        for _ in range(2):  # a second forward must start again at layer 0 in the copy too
            assert torch.equal(twin(ids).logits, ref)
        assert torch.equal(model(ids).logits, ref)
