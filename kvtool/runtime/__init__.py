"""Code that runs *converted* models: kvtool's MLA and Ladder model classes, the tensor-parallel decoder, the
quantized-KV runtime, and the one RoPE/RMSNorm implementation.

Importing this package is cheap; :func:`register_auto_classes` imports the model classes, which register
themselves with transformers' Auto classes (``import kvtool`` calls it, except in the CLI, which calls it when
it loads a model).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``kvtool.runtime.Int2Cache`` without importing transformers' cache module at package import."""
    if name in ("Int2Cache", "Int2Layer"):
        from kvtool.runtime import int2_cache

        return getattr(int2_cache, name)
    raise AttributeError(name)


def register_auto_classes() -> None:
    """Register kvtool's converted-model configs and classes with AutoConfig / AutoModelForCausalLM (idempotent)."""
    import kvtool.runtime.ladder  # noqa: F401
    import kvtool.runtime.mla  # noqa: F401
