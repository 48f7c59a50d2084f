"""kvtool's GGUF writer (``kvtool export-gguf``) with the ``gguf`` package alone: the deepseek2 layout llama.cpp's
loader reads (names, shapes, types, hyperparameters, the kv_b_proj split), a Llama model that round-trips through
transformers' GGUF loader to the same logits, the tokenizer, and bad input. The comparison with llama.cpp's own
converter and with llama.cpp itself is `make test-engines` (tests/engines/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.cli import app

gguf = pytest.importorskip("gguf")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def read(path):
    """(fields by key -> contents, tensors by name -> (type name, GGUF shape, float32 array in row layout))."""
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            data = data.view(np.float16)
        tensors[t.name] = (t.tensor_type.name, tuple(int(x) for x in t.shape), data.astype(np.float32))
    return fields, tensors


@pytest.fixture(scope="module")
def ds_export(tmp_path_factory, tiny_tokenizer):
    """A 2-layer tiny model converted with --format deepseek-v3 (q_lora null) and with --q-lora identity."""
    root = tmp_path_factory.mktemp("gguf")
    src = root / "src"
    tiny_model("llama", num_hidden_layers=2, initializer_range=0.2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    outs = {}
    for name, extra in (("plain", []), ("identity", ["--q-lora", "identity"])):
        res = run("convert-mla", src, "-o", root / name, "--format", "deepseek-v3", "--kv-ratio", 0.5, "--device",
                  "cpu", "--samples", 2, "--seq-len", 32, "--no-progress", *extra)
        assert res.exit_code == 0, res.output
        outs[name] = root / name
    return outs


@pytest.mark.parametrize("q_lora", ["plain", "identity"])
def test_deepseek2_layout_is_what_llama_cpp_loads(ds_export, tmp_path, q_lora):
    from safetensors.torch import load_file

    src = ds_export[q_lora]
    res = run("export-gguf", src, "-o", tmp_path / "g", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["architecture"] == "deepseek2" and report["pre_tokenizer"] == "gpt-2"
    fields, tensors = read(tmp_path / "g" / "model.gguf")
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    r, rope, nope, v, n_h = (cfg[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                                               "num_attention_heads"))
    a = "deepseek2."
    assert fields["general.architecture"] == "deepseek2"
    assert fields[a + "attention.q_lora_rank"] == (cfg["q_lora_rank"] or 0)  # 0: llama.cpp's q_proj path
    assert fields[a + "attention.kv_lora_rank"] == r
    assert (fields[a + "attention.key_length"], fields[a + "attention.value_length"]) == (r + rope, r)
    assert (fields[a + "attention.key_length_mla"], fields[a + "attention.value_length_mla"]) == (nope + rope, v)
    assert fields[a + "attention.head_count_kv"] == 1 and fields[a + "rope.dimension_count"] == rope
    assert fields[a + "leading_dense_block_count"] == cfg["num_hidden_layers"]
    assert fields[a + "rope.freq_base"] == pytest.approx(cfg["rope_theta"], rel=1e-6)
    assert len(fields["tokenizer.ggml.tokens"]) == cfg["vocab_size"] and fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.merges"]) > 0
    q_names = ("attn_q_a", "attn_q_a_norm", "attn_q_b") if q_lora == "identity" else ("attn_q",)
    want = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(cfg["num_hidden_layers"]):
        want |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b",
                                                 "attn_v_b", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                                                 "ffn_down", *q_names)}
    assert set(tensors) == want
    # GGUF shapes are ggml's (reversed): llama.cpp's create_tensor shapes in deepseek2.cpp
    assert tensors["blk.0.attn_k_b.weight"][:2] == ("F16", (nope, r, n_h))
    assert tensors["blk.0.attn_v_b.weight"][:2] == ("F16", (r, v, n_h))
    assert tensors["blk.0.attn_kv_a_mqa.weight"][1] == (cfg["hidden_size"], r + rope)
    assert tensors["blk.0.attn_kv_a_norm.weight"][0] == "F32" and tensors["blk.0.attn_norm.weight"][0] == "F32"
    # the split recomposes kv_b_proj: per head [k_b (nope rows); v_b (v rows)] over the latent
    k_b = torch.from_numpy(tensors["blk.1.attn_k_b.weight"][2]).view(n_h, r, nope)
    v_b = torch.from_numpy(tensors["blk.1.attn_v_b.weight"][2]).view(n_h, v, r)
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, r)
    ref = state["model.layers.1.self_attn.kv_b_proj.weight"].float()
    torch.testing.assert_close(kv_b, ref.half().float(), rtol=0, atol=0)
    emb = torch.from_numpy(tensors["token_embd.weight"][2]).view(cfg["vocab_size"], cfg["hidden_size"])
    torch.testing.assert_close(emb, state["model.embed_tokens.weight"].float().half().float(), rtol=0, atol=0)


def test_llama_gguf_round_trips_to_the_same_logits(tiny_checkpoint, tmp_path):
    """The Llama writer (the original model, for comparisons in llama.cpp) permutes q/k rows to GGML's pair order;
    transformers' GGUF loader undoes llama.cpp's permutation, so the f32 file loads back to the same logits."""
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("llama")
    res = run("export-gguf", src, "-o", tmp_path / "g", "--type", "f32")
    assert res.exit_code == 0, res.output
    fields, tensors = read(tmp_path / "g" / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count_kv"] == 2
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"][2]).view(64, 64)
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert not torch.equal(q, orig.model.layers[0].self_attn.q_proj.weight)  # permuted, not copied
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32).eval()
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, orig(x).logits, rtol=1e-5, atol=1e-5)


def test_export_gguf_bad_input(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    res = run("export-gguf", src, "-o", tmp_path / "q")
    assert res.exit_code == 2 and res.output.startswith("error:") and "model_type 'qwen2'" in res.output
    assert not (tmp_path / "q").exists()
    llama = tiny_checkpoint("llama")
    res = run("export-gguf", llama, "-o", tmp_path / "t", "--type", "q4")
    assert res.exit_code == 2 and "unknown --type 'q4'" in res.output and not (tmp_path / "t").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    res = run("export-gguf", llama, "-o", tmp_path / "taken")
    assert res.exit_code == 2 and "already exists" in res.output
    tok = json.loads((llama / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (llama / "tokenizer.json").write_text(json.dumps(tok))
    before = {p.name: p.read_bytes() for p in llama.iterdir()}
    res = run("export-gguf", llama, "-o", tmp_path / "w")
    assert res.exit_code == 2 and "--pre-tokenizer NAME" in res.output and not (tmp_path / "w").exists()
    assert {p.name: p.read_bytes() for p in llama.iterdir()} == before  # the input is never modified


def test_convert_mla_format_gguf_writes_the_checkpoint_and_its_gguf(tiny_checkpoint, tmp_path):
    """--format gguf: the deepseek-v3 checkpoint (still stock transformers) plus model.gguf beside it, the same
    file export-gguf writes from that checkpoint."""
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("llama", num_hidden_layers=2)
    res = run("convert-mla", src, "-o", tmp_path / "o", "--format", "gguf", "--kv-ratio", 0.5, "--device", "cpu",
              "--samples", 2, "--seq-len", 32, "--no-progress")
    assert res.exit_code == 0, res.output
    out = tmp_path / "o"
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "DeepseekV3ForCausalLM"
    manifest = json.loads((out / "kvtool.json").read_text())
    assert manifest["options"]["format"] == "gguf" and "model.gguf" in manifest["checksums"]
    fields, tensors = read(out / "model.gguf")
    assert fields["deepseek2.attention.q_lora_rank"] == 0 and "blk.1.attn_q.weight" in tensors
    res = run("export-gguf", out, "-o", tmp_path / "e", "--type", "f32")
    assert res.exit_code == 0, res.output
    _, again = read(tmp_path / "e" / "model.gguf")
    assert set(again) == set(tensors)
    for name, (kind, shape, data) in tensors.items():
        assert again[name][:2] == (kind, shape) and np.array_equal(again[name][2], data), name
