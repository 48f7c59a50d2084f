"""Shared fixtures: tiny random-weight models of each supported architecture, a tiny tokenizer, the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False)


def tiny_config(arch: str, **overrides):
    """A small config of a supported architecture (random weights are made by the model constructor)."""
    from transformers import AutoConfig

    kw = {**TINY, **overrides}
    if arch in ("qwen2", "qwen3", "mistral"):
        kw.setdefault("sliding_window", None)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random-weight causal LM in float32, eval mode, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():  # make norms non-trivial so tests exercise their weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 300 ids trained on the embedded text (milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvtool.data import embedded_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([embedded_text("calib")[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_tokenizer):
    """Write a tiny model + tokenizer to a folder; returns a factory taking the architecture."""
    def make(arch: str = "llama", **overrides) -> Path:
        model = tiny_model(arch, **overrides)
        out = tmp_path / f"tiny-{arch}"
        model.save_pretrained(out)
        tiny_tokenizer.save_pretrained(out)
        return out
    return make


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from kvtool.models import load_model

    return load_model("smollm2-135m")
