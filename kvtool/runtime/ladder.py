"""Ladder-residual checkpoints: config + ``*ForCausalLM`` classes, registered with transformers' Auto classes.

Ladder residual (Zhang et al., ICML 2025, arXiv 2501.06589) numbers the attention and MLP modules of the
decoder ``0 .. 2L-1`` and writes the residual stream before module ``j`` as ``x_j``. A standard module reads
the newest stream, ``x_{j+1} = x_j + f_j(x_j)``; a ladder module reads the stream *one module earlier*,

    x_{j+1} = x_j + f_j(x_{j-1})          (x_{-1} := x_0, the embeddings)

so under tensor parallelism the all-reduce of ``f_{j-1}`` can run while ``f_j`` computes. For decoder layer ``i``
whose modules are attention ``2i`` and MLP ``2i+1`` this gives (as in the authors' HF and gpt-fast code):

* attention reads the stream *without* the previous layer's MLP output (the stream after layer ``i-1``'s
  attention, which may itself be a standard layer),
* the MLP reads the stream *without* this layer's attention output (the layer's input),
* the layer's output is the full sum ``h + attn + mlp``.

Only the wiring changes; the weights are the source model's. The config keeps every field of the source model,
names it in ``kvtool_source_model_type`` (so :class:`kvtool.models.ArchSpec` applies) and lists the ladder layers
in ``ladder_layers``. With no ladder layers the model is the source model, bit for bit.

One config/model class pair exists per supported source architecture (``kvtool_ladder_llama``, ``..._qwen2``,
``..._qwen3``, ``..._mistral``); each subclasses the source classes, so caching, generation and tied
embeddings behave as in the source model.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvtool.errors import KvtoolError
from kvtool.runtime.hf_cache import cache_kwarg, take_cache

SOURCES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
LADDER_PREFIX = "kvtool_ladder_"
_STATE = "_kvtool_ladder_state"


def ladder_model_type(source_type: str) -> str:
    """The ``model_type`` of ladder checkpoints converted from ``source_type`` (e.g. ``kvtool_ladder_llama``)."""
    return LADDER_PREFIX + source_type


# ------------------------------------------------------------------------------------------- the recurrence

def _ladder_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None,
                          position_ids: Any = None, use_cache: bool | None = False, position_embeddings: Any = None,
                          **kwargs: Any) -> torch.Tensor:
    """Forward of a decoder layer inside a model with ladder layers (bound to each layer instance).

    ``hidden_states`` is the full stream ``x_{2i}``; the shared state holds ``x_{2i-1}`` (the stream before the
    previous module's output was added). A standard layer computes exactly what the source layer computes.
    """
    state = getattr(self, _STATE)
    index = self.self_attn.layer_idx
    if state.get("next", 0) != index:
        raise RuntimeError(
            f"ladder layer {index} called out of order (expected layer {state.get('next', 0)}): a model with ladder "
            "layers must run its decoder layers in sequence inside one model forward")
    stale = state.get("stale")
    if stale is None:
        stale = hidden_states  # x_{-1} := x_0 before the first module
    cache = take_cache(kwargs)  # either spelling; the source attention gets the installed version's
    attn_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                       position_embeddings=position_embeddings, **{cache_kwarg(): cache}, **kwargs)
    out, mid = ladder_layer_step(self, hidden_states, stale, self.kvtool_ladder, attn_kwargs)
    state["stale"] = mid
    state["next"] = index + 1
    return out


def ladder_layer_step(layer: nn.Module, hidden_states: torch.Tensor, stale: torch.Tensor, ladder: bool,
                      attn_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer of the recurrence, stateless: (layer output, ``x_{2i+1}`` = stream after its attention).

    ``hidden_states`` is ``x_{2i}``, ``stale`` is ``x_{2i-1}`` (what a ladder attention reads); a standard layer
    (``ladder=False``) ignores ``stale`` and computes what the source layer computes.
    """
    if ladder:
        attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(stale), **attn_kwargs)
        mid = hidden_states + attn_out                                    # x_{2i+1}
        mlp_out = layer.mlp(layer.post_attention_layernorm(hidden_states))  # reads x_{2i}, not x_{2i+1}
    else:
        attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **attn_kwargs)
        mid = hidden_states + attn_out
        mlp_out = layer.mlp(layer.post_attention_layernorm(mid))
    return mid + mlp_out, mid


def _reset_state(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the base model: a new forward starts at layer 0 (state lives on the module, so
    ``copy.deepcopy`` of a ladder model keeps its own state)."""
    getattr(module, _STATE).clear()


def install_ladder(model: nn.Module, ladder_layers: Iterable[int]) -> nn.Module:
    """Rewire ``ladder_layers`` of a loaded HF causal LM in place (weights untouched); returns the model.

    With an empty list nothing is changed, so the model computes exactly what it computed before. Calling it
    again replaces the previous choice.
    """
    layers = model.model.layers
    chosen = sorted(set(int(i) for i in ladder_layers))
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise KvtoolError(f"ladder layer(s) {bad} out of range: the model has layers 0..{len(layers) - 1}")
    remove_ladder(model)
    if not chosen:
        return model
    state: dict = {}
    for i, layer in enumerate(layers):
        for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, name):
                raise KvtoolError(f"decoder layer {i} has no {name}: ladder residual needs pre-norm layers with "
                                  "separate attention and MLP residual adds (Llama/Qwen2/Qwen3/Mistral)")
        layer.kvtool_ladder = i in chosen
        setattr(layer, _STATE, state)
        layer.forward = types.MethodType(_ladder_layer_forward, layer)
    setattr(model.model, _STATE, state)
    model._kvtool_ladder_hook = model.model.register_forward_pre_hook(_reset_state, with_kwargs=True)
    model._kvtool_ladder_layers = chosen
    return model


def remove_ladder(model: nn.Module) -> nn.Module:
    """Undo :func:`install_ladder`: every layer runs the source forward again."""
    hook = getattr(model, "_kvtool_ladder_hook", None)
    if hook is not None:
        hook.remove()
        model._kvtool_ladder_hook = None
    if _STATE in vars(model.model):
        delattr(model.model, _STATE)
    for layer in model.model.layers:
        if "forward" in vars(layer):
            del layer.forward
        for attr in ("kvtool_ladder", _STATE):
            if attr in vars(layer):
                delattr(layer, attr)
    model._kvtool_ladder_layers = []
    return model


def ladder_layers_of(model: nn.Module) -> list[int]:
    """The ladder layers currently installed in ``model``."""
    return list(getattr(model, "_kvtool_ladder_layers", []) or [])


# ------------------------------------------------------------------------------------- config/model classes

def _make_classes(source_type: str, config_cls: type, model_cls: type) -> tuple[type, type]:
    model_type = ladder_model_type(source_type)
    stem = config_cls.__name__.removesuffix("Config")

    config_ns = {
        "model_type": model_type,
        "__annotations__": {"kvtool_source_model_type": str, "ladder_layers": list[int] | None},
        "kvtool_source_model_type": source_type,
        "ladder_layers": None,
        "__doc__": f"{stem} config with ``ladder_layers`` (decoder layers using Ladder residual).",
        "__module__": __name__,
    }
    ladder_config = strict(type(f"Ladder{stem}Config", (config_cls,), config_ns))

    def __init__(self: Any, config: Any) -> None:
        model_cls.__init__(self, config)
        install_ladder(self, config.ladder_layers or [])

    model_ns = {
        "config_class": ladder_config,
        "__init__": __init__,
        "__doc__": f"{stem} causal LM whose ``config.ladder_layers`` use Ladder residual (weights as the source).",
        "__module__": __name__,
    }
    ladder_model = type(f"Ladder{stem}ForCausalLM", (model_cls,), model_ns)
    return ladder_config, ladder_model


CONFIG_CLASSES: dict[str, type] = {}
MODEL_CLASSES: dict[str, type] = {}
for _source, (_cfg, _mdl) in SOURCES.items():
    _c, _m = _make_classes(_source, _cfg, _mdl)
    CONFIG_CLASSES[_source], MODEL_CLASSES[_source] = _c, _m
    globals()[_c.__name__], globals()[_m.__name__] = _c, _m
    AutoConfig.register(ladder_model_type(_source), _c, exist_ok=True)
    AutoModelForCausalLM.register(_c, _m, exist_ok=True)


def ladder_config(source_config: Any, ladder_layers: Iterable[int]) -> Any:
    """The ladder config for a source model config: all source fields + ``ladder_layers``."""
    source_type = getattr(source_config, "model_type", None)
    if source_type not in CONFIG_CLASSES:
        if isinstance(source_type, str) and source_type.startswith(LADDER_PREFIX):
            raise KvtoolError(f"the model is already a ladder checkpoint ({source_type}): convert its source model")
        raise KvtoolError(f"ladder residual is not supported for architecture {source_type!r}: it needs a plain "
                          f"{'/'.join(SOURCES)} checkpoint (pre-norm layers with separate attention and MLP adds)")
    fields = source_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "kvtool_source_model_type",
                "ladder_layers"):
        fields.pop(key, None)
    config = CONFIG_CLASSES[source_type](**fields, ladder_layers=sorted(set(int(i) for i in ladder_layers)))
    config.architectures = [MODEL_CLASSES[source_type].__name__]
    return config
