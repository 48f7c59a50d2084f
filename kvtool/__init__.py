"""kvtool: offline model conversion for cheaper LLM serving.

``import kvtool`` registers kvtool's own model classes (converted checkpoints) with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(out)`` works. The ``kvtool`` command skips that at start-up (it
imports transformers, seconds) and registers when it loads a model.

The card's top-level folders ``calib/``, ``convert/`` and ``kernels/`` are kvtool's subpackages ``kvtool.calib``,
``kvtool.convert`` and ``kvtool.kernels``. They hold no ``__init__.py``, so none of them is ever importable as a
top-level package that would shadow another distribution's (Hugging Face's ``kernels``, which transformers imports):
an install copies them under ``kvtool/`` (pyproject's package-dir), and run from a checkout (editable install,
``python -m pytest`` in the root) :class:`_CardFolders` points the subpackages at the folders beside this one.
"""

import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

from kvtool.errors import KvtoolError

__version__ = "0.2.0"

_HERE = Path(__file__).resolve().parent
CARD_FOLDERS = ("calib", "convert", "kernels")


class _CardFolders:
    """Meta-path finder: ``kvtool.<folder>`` of a checkout is the namespace package ``<checkout>/<folder>``."""

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent != "kvtool" or name not in CARD_FOLDERS or (_HERE / name).is_dir():
            return None  # installed: kvtool/<folder> is found the ordinary way
        folder = _HERE.parent / name
        if not folder.is_dir():
            return None
        spec = ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec


if not any(f is _CardFolders for f in sys.meta_path):
    sys.meta_path.append(_CardFolders)

if os.path.basename(sys.argv[0] if sys.argv else "") != "kvtool":
    from kvtool.runtime import register_auto_classes

    register_auto_classes()

__all__ = ["KvtoolError", "__version__"]
