"""GGUF for llama.cpp, written by kvtool with the ``gguf`` package (no llama.cpp checkout needed).

Two architectures, laid out as llama.cpp's own ``convert_hf_to_gguf.py`` lays them out (the engine test compares the
two files tensor by tensor and key by key):

* ``deepseek2`` from a ``--format deepseek-v3`` export (``DeepseekV3ForCausalLM``, dense MLPs): the MLA latent cache.
  ``kv_b_proj`` is split per head into ``attn_k_b`` (transposed, [n_h, kv_lora_rank, nope]) and ``attn_v_b``
  ([n_h, v, kv_lora_rank]), llama.cpp's absorbed layout; the key/value lengths are the latent's (kv_lora_rank +
  rope, kv_lora_rank) and the ``_mla`` ones the per-head widths. ``q_lora_rank: null`` (the plain ``q_proj``
  path) is written as ``attention.q_lora_rank = 0``: llama.cpp then loads ``attn_q`` for any layer count, where its
  converter, which leaves the key out, only loads 26- and 27-layer models.
* ``llama`` from a Llama-family source (``LlamaForCausalLM``): ``q_proj``/``k_proj`` rows permuted from the rotate-half
  order to GGML's adjacent pairs, as llama.cpp's converter does (the original model, for comparisons).

Tensor types: ``f16``/``bf16``/``f32`` for the matrices; 1-D tensors and norms always f32 (llama.cpp's rule).
Tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``) from the checkpoint's tokenizer files, special tokens,
merges and chat template through ``gguf.SpecialVocab`` as llama.cpp's converter does; the pre-tokenizer name is read
from ``tokenizer.json``'s structure (:func:`pre_tokenizer_name`) or given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtool.errors import KvtoolError

OUT_TYPES = ("f16", "bf16", "f32")
GGUF_FILE = "model.gguf"  # the file in an export-gguf / --format gguf output folder
ARCHS = {"deepseek_v3": "deepseek2", "llama": "llama"}
# the Llama-3 pre-tokenizer split (llama.cpp's "llama-bpe"), as tokenizer.json spells it
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def gguf_arch(config: dict[str, Any]) -> str:
    """llama.cpp's architecture name for a checkpoint's config.json; KvtoolError for what kvtool does not write."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise KvtoolError(f"kvtool writes GGUF for DeepSeek-V3 exports (convert-mla --format deepseek-v3) and Llama "
                          f"models, not model_type {model_type!r}: convert it first, or use llama.cpp's "
                          "convert_hf_to_gguf.py")
    if model_type == "deepseek_v3":
        n_layers, dense = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
        if dense < n_layers:
            raise KvtoolError(f"this DeepSeek-V3 checkpoint has MoE layers (first_k_dense_replace {dense} < "
                              f"{n_layers} layers); kvtool writes dense DeepSeek-V3 exports only: use llama.cpp's "
                              "convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or config.get("rope_scaling"):
        raise KvtoolError("kvtool's GGUF writer handles default RoPE only (no scaling): use llama.cpp's "
                          "convert_hf_to_gguf.py for this model")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise KvtoolError("kvtool's GGUF writer handles models without attention/MLP biases: use llama.cpp's "
                          "convert_hf_to_gguf.py")
    return ARCHS[model_type]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection from HF's rotate-half order to GGML's adjacent pairs (llama.cpp's converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF tensor name, float32 tensor in GGUF's row layout) for every tensor llama.cpp reads, in state order."""
    import gguf

    arch = gguf_arch(config)
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2 if arch == "deepseek2" else gguf.MODEL_ARCH.LLAMA,
                                     n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    n_h = config["num_attention_heads"]
    for name, t in state.items():
        if name.endswith(".rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        t = t.detach().to(torch.float32)
        if arch == "deepseek2" and name.endswith("self_attn.kv_b_proj.weight"):
            nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
            kv_b = t.view(n_h, nope + v, t.shape[-1])
            k_b, v_b = torch.split(kv_b, [nope, v], dim=1)
            for part, data in (("k_b_proj", k_b.transpose(1, 2)), ("v_b_proj", v_b)):
                yield _gguf_name(names, name.replace("kv_b_proj", part)), data.contiguous()
            continue
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            t = _permute(t, n_h)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            t = _permute(t, config.get("num_key_value_heads", n_h))
        yield _gguf_name(names, name), t


def _gguf_name(names: Any, name: str) -> str:
    new = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise KvtoolError(f"tensor {name} has no llama.cpp name: this checkpoint is not one kvtool writes as GGUF "
                          "(use llama.cpp's convert_hf_to_gguf.py)")
    return new


def tensor_type(gguf_name: str, ndim: int, out_type: str) -> Any:
    """The GGML type llama.cpp's converter picks: f32 for 1-D tensors and norms, else ``out_type``."""
    import gguf

    q = gguf.GGMLQuantizationType
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return q.F32
    return {"f16": q.F16, "bf16": q.BF16, "f32": q.F32}[out_type]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json`` (None when not recognised).

    ByteLevel with its GPT-2 regex: ``gpt-2``; individual digits then ByteLevel: ``smollm``; the Llama-3 split then
    ByteLevel without regex: ``llama-bpe``. llama.cpp's converter names them by hashing a test string's ids instead;
    the engine test checks both agree on the embedded model's tokenizer.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


def gguf_pre_tokenizer(path: Path) -> str | None:
    """``tokenizer.ggml.pre`` of a GGUF file (None when it has none)."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.Tokenizer.PRE)
    return None if field is None else str(field.contents())


def tokenizer_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) of a byte-level BPE tokenizer, ids 0..vocab_size-1, as llama.cpp's converter lists
    them: unused ids as ``[PAD{i}]``, added special tokens (or ones that look special) CONTROL, other added tokens
    USER_DEFINED."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise KvtoolError(f"the tokenizer in {model_dir} has ids up to {max(vocab.values())}, beyond the model's "
                          f"vocab_size {vocab_size}: the checkpoint's tokenizer files do not belong to it")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _add_hparams(writer: Any, config: dict[str, Any], arch: str, out_type: str) -> None:
    import gguf

    c = config
    n_layers = c["num_hidden_layers"]
    writer.add_block_count(n_layers)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "f32": gguf.LlamaFileType.ALL_F32}[out_type])
    writer.add_vocab_size(c["vocab_size"])
    if arch == "llama":
        n_h = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // n_h
        writer.add_head_count_kv(c.get("num_key_value_heads", n_h))
        writer.add_rope_dimension_count(head_dim)
        if c.get("head_dim") is not None:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        return
    # deepseek2: MLA as multi-query attention over the latent (one KV head of width kv_lora_rank + rope)
    r, rope_dim = c["kv_lora_rank"], c["qk_rope_head_dim"]
    writer.add_head_count_kv(1)
    writer.add_leading_dense_block_count(c.get("first_k_dense_replace", n_layers))
    writer.add_q_lora_rank(c.get("q_lora_rank") or 0)
    writer.add_kv_lora_rank(r)
    writer.add_key_length(r + rope_dim)
    writer.add_value_length(r)
    writer.add_key_length_mla(c["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(c["v_head_dim"])
    writer.add_expert_feed_forward_length(c.get("moe_intermediate_size") or c["intermediate_size"])
    writer.add_expert_shared_count(c.get("n_shared_experts") or 0)
    writer.add_rope_dimension_count(rope_dim)


def read_checkpoint(model_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a safetensors checkpoint folder, tensors as stored."""
    from safetensors.torch import load_file

    cfg_path = model_dir / "config.json"
    files = sorted(model_dir.glob("*.safetensors"))
    if not cfg_path.is_file() or not files:
        raise KvtoolError(f"{model_dir} is not a checkpoint folder (config.json + *.safetensors): give the output "
                          "folder of convert-mla --format deepseek-v3 (or heal), or a Llama checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return json.loads(cfg_path.read_text()), state


def write_gguf(model_dir: Path, out_file: Path, out_type: str = "f16", pre_tokenizer: str | None = None,
               name: str | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (a checkpoint folder) as one GGUF file ``out_file``; returns a report (architecture,
    tensor count, bytes, pre-tokenizer, q_lora_rank)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise KvtoolError(f"unknown GGUF type {out_type!r}: use {', '.join(OUT_TYPES)}")
    config, state = read_checkpoint(model_dir)
    arch = gguf_arch(config)
    tok_json = model_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise KvtoolError(f"{model_dir} has no tokenizer.json (a fast byte-level BPE tokenizer): copy the source "
                          "model's tokenizer files into it")
    tj = json.loads(tok_json.read_text())
    if (tj.get("model") or {}).get("type") != "BPE":
        raise KvtoolError(f"kvtool's GGUF writer handles byte-level BPE tokenizers; {tok_json} is "
                          f"{(tj.get('model') or {}).get('type')!r}: use llama.cpp's convert_hf_to_gguf.py")
    pre = pre_tokenizer or pre_tokenizer_name(tj)
    if pre is None:
        raise KvtoolError(f"the pre-tokenizer in {tok_json} is not one kvtool recognises (gpt-2, smollm, llama-bpe): "
                          "pass --pre-tokenizer NAME with llama.cpp's name for it")
    tensors = list(gguf_tensors(state, config))  # every name checked before anything is written
    tokens, types = tokenizer_vocab(model_dir, config["vocab_size"])
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    _add_hparams(writer, config, arch, out_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_bytes = 0
    for gname, t in tensors:
        qtype = tensor_type(gname, t.dim(), out_type)
        data = t.numpy()
        data = gguf.quants.quantize(data, qtype) if qtype != gguf.GGMLQuantizationType.F32 else data.astype(np.float32)
        n_bytes += data.nbytes
        writer.add_tensor(gname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensors": len(tensors), "tensor_bytes": n_bytes, "type": out_type,
            "pre_tokenizer": pre, "q_lora_rank": config.get("q_lora_rank") if arch == "deepseek2" else None,
            "layers": config["num_hidden_layers"], "file_bytes": out_file.stat().st_size}


def source_pre_tokenizer(directory: Path, source: str) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF the checkpoint came from (the model argument itself, or the source that
    its kvtool.json names, followed through kvtool outputs), or None. transformers' GGUF tokenizer conversion drops
    pre-tokenizer steps (SmolLM2's digit split), so the source file's own name is the one to keep."""
    from kvtool.models import EMBEDDED_MODEL, embedded_gguf_path

    seen = set()
    while True:
        if source == EMBEDDED_MODEL:
            return gguf_pre_tokenizer(embedded_gguf_path())
        if source.endswith(".gguf") and Path(source).is_file():
            return gguf_pre_tokenizer(Path(source))
        manifest = directory / "kvtool.json"
        if directory in seen or not manifest.is_file():
            return None
        seen.add(directory)
        model = json.loads(manifest.read_text()).get("model") or {}
        source = str(model.get("source") or "")
        directory = Path(source)
