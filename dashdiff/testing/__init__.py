"""Test support, not the library: tiny random-weight models (``models``) for the tests, the
offline demo and the benchmarks' development sizes."""

from .models import *  # noqa: F401,F403
from .models import __all__  # noqa: F401
