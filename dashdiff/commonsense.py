"""Moved: the LLM-Adapters commonsense data and evaluation code is ``train/commonsense_data.py``,
next to the scripts that use it. This re-export keeps ``dashdiff.commonsense`` importable for
code outside ``train/`` (``assets/pretrain/pretrain_llama.py``) in a repository checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "commonsense_data"  # the name the scripts import it under (their folder is on sys.path)
_PATH = Path(__file__).resolve().parents[1] / "train" / "commonsense_data.py"

if _NAME in sys.modules:
    _module = sys.modules[_NAME]
else:
    if not _PATH.is_file():
        raise ImportError(f"dashdiff.commonsense re-exports {_PATH}, which is not there: it is part of the "
                          "repository's train/ folder, not of an installed dashdiff")
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module  # one module object, however it is reached
    _spec.loader.exec_module(_module)

globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
