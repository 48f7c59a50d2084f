"""The name transformers gives the cache argument of attention and decoder layers.

Up to 5.2x it is ``past_key_values``; from 5.25 it is ``cache`` (``past_key_values`` deprecated, to be removed in
5.40). kvtool's own layers accept both spellings (:func:`take_cache`); calls kvtool makes into transformers' own
modules use the installed version's name (:func:`cache_kwarg`).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


@cache
def cache_kwarg() -> str:
    """``"cache"`` or ``"past_key_values"``: what the installed transformers' decoder layers take."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    return "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Pop the cache from a layer's keyword arguments under either name; None when neither holds one."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def output_cache(output: Any) -> Any:
    """The cache a model forward returned (``output.cache`` from 5.25, ``output.past_key_values`` before)."""
    return output["cache"] if "cache" in output else output.past_key_values
