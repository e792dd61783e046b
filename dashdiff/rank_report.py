"""Moved to dashdiff.autolora.report; shim removed after the branches merge."""

from .autolora.report import *  # noqa: F401,F403
from .autolora.report import INSTALL_HINT, REPORT_STEM, report_layers, write_rank_report  # noqa: F401
