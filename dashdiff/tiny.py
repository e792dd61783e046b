"""Moved to dashdiff.testing; shim removed after the branches merge."""

from .testing.models import *  # noqa: F401,F403
from .testing.models import (  # noqa: F401
    _CLIP_EOW,
    _byte_alphabet,
    _clip_vocab_and_merges,
    _learn_merges,
    _save_reserved,
)
