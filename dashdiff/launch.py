"""Moved to dashdiff.dash.selection; shim removed after the branches merge."""

from .dash.selection import *  # noqa: F401,F403
from .dash.selection import _EPS32, GramEig, Selection, Spectrum, _select_from_host_eig  # noqa: F401
