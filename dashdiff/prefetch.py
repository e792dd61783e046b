"""Moved to dashdiff.dash.prefetch; shim removed after the branches merge."""

from .dash.prefetch import *  # noqa: F401,F403
from .dash.prefetch import FinishReport, SpectrumPrefetcher, default_workers, prefetch_spectra  # noqa: F401
