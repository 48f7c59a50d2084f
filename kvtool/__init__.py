"""kvtool: offline model conversion for cheaper LLM serving.

``import kvtool`` registers kvtool's own model classes (converted checkpoints) with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(out)`` works. The ``kvtool`` command skips that at start-up (it
imports transformers, seconds) and registers when it loads a model.
"""

import os
import sys

from kvtool.errors import KvtoolError

__version__ = "0.2.0"

if os.path.basename(sys.argv[0] if sys.argv else "") != "kvtool":
    from kvtool.runtime import register_auto_classes

    register_auto_classes()

__all__ = ["KvtoolError", "__version__"]
