"""Moved to dashdiff.dash.kernel and dashdiff.autolora.kernel; shim removed after the branches merge."""

from .autolora.kernel import FusedAutoLoraLinear, PairedAutoLoraLinear, autolora_reference  # noqa: F401
from .dash.kernel import FusedDashLinear, operands  # noqa: F401
from .ops import mm_to as _mm_to  # noqa: F401
