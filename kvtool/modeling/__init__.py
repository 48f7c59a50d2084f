"""kvtool's own model classes for converted checkpoints, registered with transformers' Auto classes.

Each module in this package defines a config + ``*ForCausalLM`` class for one converted format and registers
them at import (``AutoConfig.register`` / ``AutoModelForCausalLM.register``). Importing this package imports
every module in it, so ``AutoModelForCausalLM.from_pretrained(out)`` works after ``import kvtool``.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
