"""Moved to dashdiff.dash.kernel and dashdiff.autolora.kernel; shim removed after the branches merge.

Absolute imports: bench/ab_dash_function.py loads a copy of this file as a standalone module."""

from dashdiff.autolora.kernel import FusedAutoLoraLinear, PairedAutoLoraLinear, autolora_reference  # noqa: F401
from dashdiff.dash.kernel import FusedDashLinear, operands  # noqa: F401
from dashdiff.ops import mm_to as _mm_to  # noqa: F401
