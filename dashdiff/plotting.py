"""Drawing helpers shared by dashdiff's figures (``inspect_plots`` and the AutoLoRA rank report).

matplotlib is an optional dependency (``pip install "dashdiff[plots]"``): it is imported inside
the functions only, and pyplot is never used. pyplot keeps global figure state, which is not safe
in a web server that runs handlers on several threads; a bare ``Figure`` is.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

PLOT_HINT = 'dashdiff: plots need matplotlib: pip install "dashdiff[plots]" (or "dashdiff[app]")'
# Past this many layers the per-layer tick labels would overlap: label every n-th row only.
_MAX_LABELLED_ROWS = 60
_MAX_FIG_HEIGHT_IN = 24.0

# Diffusers' module paths are long; these abbreviations keep plot labels readable.
_ABBREVIATIONS = (
    (r"^unet\.", ""),
    (r"^transformer\.", ""),
    (r"down_blocks\.", "down"),
    (r"up_blocks\.", "up"),
    (r"mid_block\.", "mid."),
    (r"attentions\.", "att"),
    (r"transformer_blocks\.", "tb"),
    (r"text_model\.encoder\.layers\.", "L"),
    (r"^text_encoder_2\.", "te2."),
    (r"^text_encoder\.", "te."),
    (r"self_attn\.", ""),
)


def short_name(name: str) -> str:
    """``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``down1.att0.tb0.attn1.to_q``."""
    for pattern, repl in _ABBREVIATIONS:
        name = re.sub(pattern, repl, name)
    return name


def new_figure(width: float, height: float, hint: str = PLOT_HINT) -> "Figure":
    """A bare matplotlib ``Figure`` (inches, 100 dpi); ``ImportError(hint)`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # optional dependency
        raise ImportError(hint) from e
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def to_image(fig: "Figure") -> "Image.Image":
    """The figure as a PIL image, PNG-encoded once (what the app serves is exactly this)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    return img


def rows_height(n: int, per_row: float = 0.22, base: float = 1.6) -> float:
    """Figure height (inches) for ``n`` layer rows, capped."""
    return min(max(3.2, base + per_row * n), _MAX_FIG_HEIGHT_IN)


def label_rows(ax, names: Sequence[str]) -> None:
    """Layer names (shortened) as y tick labels, every n-th when there are many; first layer on top."""
    n = len(names)
    every = max(1, math.ceil(n / _MAX_LABELLED_ROWS))
    ticks = list(range(0, n, every))
    ax.set_yticks(ticks, [short_name(names[i]) for i in ticks], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top, as in the model
