"""kvtool: offline model conversion for cheaper LLM serving.

Importing :mod:`kvtool` registers kvtool's own model classes (converted checkpoints)
with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(out)`` works.
"""

import kvtool.modeling  # noqa: F401  (registers converted-model classes with transformers' Auto classes)
from kvtool.errors import KvtoolError

__version__ = "0.1.0"

__all__ = ["KvtoolError", "__version__"]
