"""Moved to dashdiff.autolora.ranks; shim removed after the branches merge."""

from .autolora.ranks import *  # noqa: F401,F403
from .autolora.ranks import determine_ranks, keep_mask, outer_steps, selection_weights  # noqa: F401
