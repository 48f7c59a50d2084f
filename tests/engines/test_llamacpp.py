"""The DeepSeek-V3 export served by llama.cpp (`make test-engines`): kvtool's GGUF writer against llama.cpp's own
converter tensor by tensor, and llama.cpp against stock transformers on held-out tokens (relative log-prob error
≤ 1e-3, argmax agreement ≥ 99%, perplexity within 0.5%, 32 greedy tokens identical) for the healed embedded model
and for a 32-layer tiny model, with either query path.

Skipped without llama-cpp-python (CI). `make test-engines` builds it, writes the healed export into
$KVTOOL_ENGINE_OUT and points $KVTOOL_LLAMA_CPP at the sdist's vendored llama.cpp (its convert_hf_to_gguf.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvtool.cli import app

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (make test-engines builds it)")
from llamacpp_check import agreement, compare_gguf  # noqa: E402

ENGINE_OUT = os.environ.get("KVTOOL_ENGINE_OUT")
# minutes of llama.cpp on 2 cores: only under `make test-engines`, not in `make test` of a venv that has llama_cpp
pytestmark = pytest.mark.skipif(not ENGINE_OUT, reason="engine tests run through make test-engines "
                                                         "($KVTOOL_ENGINE_OUT unset)")
LLAMA_CPP = os.environ.get("KVTOOL_LLAMA_CPP")
TARGETS = {"rel_logprob_err": 1e-3, "argmax_agreement": 0.99, "ppl_rel_diff": 0.005}
# llama.cpp's converter fills these MoE keys from transformers' DeepseekV3Config defaults (256 routed experts, ...);
# every layer of the export is dense (leading_dense_block_count = block_count), so llama.cpp reads none of them and
# kvtool's writer leaves them out (expert_shared_count: 0, no shared expert)
MOE_ONLY = {f"deepseek2.{k}" for k in ("expert_count", "expert_group_count", "expert_group_used_count",
                                       "expert_shared_count", "expert_used_count", "expert_weights_norm",
                                       "expert_weights_scale")}
runner = CliRunner()


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def heldout(model_dir: Path, n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from kvtool.data import TextSource, heldout_tokens

    return heldout_tokens(AutoTokenizer.from_pretrained(str(model_dir)), TextSource(split="heldout"), n)


def record(name: str, result: dict) -> None:
    """Numbers go to $KVTOOL_ENGINE_OUT/agreement.json (make test-engines prints them)."""
    path = Path(ENGINE_OUT) / "agreement.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = result
    path.write_text(json.dumps(data, indent=2) + "\n")


def check(result: dict) -> None:
    assert result["rel_logprob_err"] <= TARGETS["rel_logprob_err"], result
    assert result["argmax_agreement"] >= TARGETS["argmax_agreement"], result
    assert result["ppl_rel_diff"] <= TARGETS["ppl_rel_diff"], result
    assert result["greedy_identical"], result


def vendored_convert(model_dir: Path, out: Path, out_type: str = "f16") -> Path:
    script = Path(LLAMA_CPP or "") / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip("needs llama.cpp's convert_hf_to_gguf.py ($KVTOOL_LLAMA_CPP: the sdist's vendor/llama.cpp)")
    subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", out_type, "--outfile", str(out)],
                   check=True, capture_output=True, cwd=script.parent)
    return out


@pytest.fixture(scope="module")
def healed():
    if not (Path(ENGINE_OUT) / "ds05-healed" / "kvtool.json").is_file():
        pytest.skip("needs the healed embedded-model export in $KVTOOL_ENGINE_OUT/ds05-healed (make test-engines)")
    return Path(ENGINE_OUT) / "ds05-healed"


@pytest.fixture(scope="module")
def healed_gguf(healed, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "g"
    run("export-gguf", healed, "-o", out)
    return out / "model.gguf"


def test_writer_equals_llama_cpp_converter_on_the_healed_export(healed, healed_gguf, tmp_path):
    theirs = vendored_convert(healed, tmp_path / "theirs.gguf")
    diff = compare_gguf(healed_gguf, theirs)
    record("writer_vs_converter_embedded", diff)
    assert diff["tensor_differences"] == [] and diff["tensors"] == 30 * 13 + 2  # q_a, q_a_norm, q_b: 13 a layer
    assert set(diff["key_differences"]) <= MOE_ONLY, diff


def test_llama_cpp_agrees_with_transformers_on_the_healed_embedded_export(healed, healed_gguf):
    result = agreement(healed, healed_gguf, heldout(healed, 2048))
    record("embedded_ds05_healed_q_lora_identity_f16", result)
    check(result)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A 32-layer tiny Llama with the embedded model's tokenizer (llama.cpp's converter recognises it), converted
    to DeepSeek-V3 with either query path."""
    from kvtool.models import resolve_model_path

    root = tmp_path_factory.mktemp("tiny32")
    src = root / "src"
    tiny_model("llama", num_hidden_layers=32, vocab_size=49152, initializer_range=0.2,
               max_position_embeddings=2048).save_pretrained(src)
    embedded_dir = resolve_model_path("smollm2-135m")[0]
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded_dir / f).is_file():
            shutil.copy(embedded_dir / f, src / f)
    outs = {}
    for name, extra in (("none", []), ("identity", ["--q-lora", "identity"])):
        run("convert-mla", src, "-o", root / name, "--format", "deepseek-v3", "--kv-ratio", 0.5, "--device", "cpu",
            "--samples", 4, "--seq-len", 64, "--no-progress", *extra)
        outs[name] = root / name
    return outs


@pytest.mark.parametrize("q_lora", ["none", "identity"])
def test_llama_cpp_agrees_on_a_32_layer_model(tiny32, tmp_path, q_lora):
    """32 layers: llama.cpp's converter leaves q_lora_rank out for q_lora_rank null and llama.cpp then refuses the
    file (it assumes no q_lora only at 26/27 layers); kvtool writes 0 and llama.cpp loads attn_q. f32 weights and an
    f32 KV cache: 32 random layers amplify rounding (with llama.cpp's default f16 cache: relative log-prob error
    7.6e-4, argmax agreement 98.8% measured), so this checks the layout, not f16 arithmetic."""
    model_dir = tiny32[q_lora]
    run("export-gguf", model_dir, "-o", tmp_path / "g", "--type", "f32")
    result = agreement(model_dir, tmp_path / "g" / "model.gguf", heldout(model_dir, 1024), kv_type="f32")
    record(f"tiny32_q_lora_{q_lora}_f32", result)
    check(result)


def test_writer_equals_llama_cpp_converter_on_a_32_layer_model(tiny32, tmp_path):
    """The source folder has the embedded tokenizer's files but no GGUF behind it: its tokenizer.json (transformers'
    conversion of the GGUF's) reads as gpt-2, which tokenizes like smollm with this vocabulary (no multi-digit
    merges); llama.cpp's converter hashes the ids and says smollm, so the name is given here."""
    run("export-gguf", tiny32["identity"], "-o", tmp_path / "g", "--pre-tokenizer", "smollm")
    diff = compare_gguf(tmp_path / "g" / "model.gguf",
                        vendored_convert(tiny32["identity"], tmp_path / "theirs.gguf"))
    record("writer_vs_converter_tiny32", diff)
    assert diff["tensor_differences"] == [] and set(diff["key_differences"]) <= MOE_ONLY, diff
