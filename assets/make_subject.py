"""Draw the sample DreamBooth subject: one stylised toy cat, five shots.

Deterministic (no randomness, fixed parameters per shot): rerunning it rewrites the same
PNGs in ``assets/subject/``. Usage: ``python assets/make_subject.py [out_dir]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SS = 4  # draw at 4x and downsample: PIL's primitives are not anti-aliased.

# The subject's identity stays fixed across shots (as a DreamBooth subject must); only the
# scene, framing and pose change.
FUR = (236, 140, 52)
STRIPE = (176, 88, 24)
BELLY = (252, 226, 190)
SCARF = (40, 110, 200)
INK = (30, 24, 20)
PINK = (240, 140, 160)


@dataclass(frozen=True)
class Shot:
    name: str
    background: tuple[int, int, int]
    floor: tuple[int, int, int]
    cx: float  # subject centre, fraction of the width
    cy: float  # subject centre, fraction of the height
    scale: float
    angle: float  # degrees, counter-clockwise
    mirror: bool


SHOTS = (
    Shot("toycat_0", (200, 225, 240), (150, 120, 90), 0.50, 0.55, 1.00, 0, False),
    Shot("toycat_1", (230, 230, 210), (120, 160, 110), 0.42, 0.58, 0.85, 8, False),
    Shot("toycat_2", (245, 215, 220), (170, 170, 180), 0.58, 0.52, 1.10, -6, True),
    Shot("toycat_3", (210, 240, 215), (200, 180, 140), 0.50, 0.60, 0.75, 0, True),
    Shot("toycat_4", (225, 215, 245), (110, 100, 130), 0.46, 0.50, 1.20, 4, False),
)


def _draw_cat(size: int) -> Image.Image:
    """The toy cat on a transparent square canvas of ``size`` px, facing right."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    u = size / 100  # drawing units: the cat is laid out on a 100x100 grid

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * u, y0 * u, x1 * u, y1 * u]

    def pts(*xy: float) -> list[tuple[float, float]]:
        return [(xy[i] * u, xy[i + 1] * u) for i in range(0, len(xy), 2)]

    w = max(1, round(2 * u))
    # Tail first so the body covers its root.
    d.line(pts(30, 72, 16, 64, 12, 48, 18, 36), fill=FUR, width=round(7 * u), joint="curve")
    d.ellipse(box(14, 32, 22, 40), fill=STRIPE)
    # Body, belly, feet.
    d.ellipse(box(24, 46, 76, 90), fill=FUR, outline=INK, width=w)
    d.ellipse(box(38, 58, 64, 88), fill=BELLY)
    for x in (30, 58):
        d.ellipse(box(x, 82, x + 14, 94), fill=FUR, outline=INK, width=w)
    for x in (34, 44, 54):  # back stripes
        d.arc(box(x - 8, 46, x + 8, 62), 200, 290, fill=STRIPE, width=round(3 * u))
    # Scarf: the subject's distinctive accessory.
    d.rounded_rectangle(box(36, 44, 72, 52), radius=3 * u, fill=SCARF)
    d.polygon(pts(62, 50, 70, 50, 74, 64, 64, 62), fill=SCARF)
    # Head with ears.
    d.polygon(pts(36, 22, 40, 4, 52, 16), fill=FUR, outline=INK)
    d.polygon(pts(62, 16, 74, 4, 78, 22), fill=FUR, outline=INK)
    d.polygon(pts(40, 18, 42, 9, 48, 15), fill=PINK)
    d.polygon(pts(66, 15, 72, 9, 74, 18), fill=PINK)
    d.ellipse(box(32, 10, 82, 50), fill=FUR, outline=INK, width=w)
    d.arc(box(48, 8, 66, 26), 30, 150, fill=STRIPE, width=round(3 * u))
    # Face: big toy eyes with highlights, nose, mouth, whiskers.
    for x in (44, 62):
        d.ellipse(box(x, 22, x + 10, 34), fill=INK)
        d.ellipse(box(x + 2, 24, x + 5, 27), fill=(255, 255, 255))
    d.polygon(pts(55, 36, 59, 36, 57, 39), fill=PINK)
    d.arc(box(51, 36, 57, 42), 0, 180, fill=INK, width=w)
    d.arc(box(57, 36, 63, 42), 0, 180, fill=INK, width=w)
    for dy in (-2, 2):
        d.line(pts(46, 38 + dy, 30, 36 + 2 * dy), fill=INK, width=w)
        d.line(pts(68, 38 + dy, 84, 36 + 2 * dy), fill=INK, width=w)
    return im


def render(shot: Shot, size: int = SIZE) -> Image.Image:
    """One ``size`` x ``size`` RGB image of the subject in the given shot."""
    big = size * SS
    im = Image.new("RGB", (big, big), shot.background)
    d = ImageDraw.Draw(im)
    horizon = round(big * 0.72)
    d.rectangle([0, horizon, big, big], fill=shot.floor)
    cat_px = round(big * 0.62 * shot.scale)
    cat = _draw_cat(cat_px)
    if shot.mirror:
        cat = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if shot.angle:
        cat = cat.rotate(shot.angle, resample=Image.Resampling.BICUBIC, expand=True)
    # Soft contact shadow so the figure stands on the floor rather than floating.
    cx, cy = shot.cx * big, shot.cy * big
    foot_y = cy + cat_px * 0.42
    d.ellipse([cx - cat_px * 0.3, foot_y - cat_px * 0.04, cx + cat_px * 0.3, foot_y + cat_px * 0.04],
              fill=tuple(int(c * 0.7) for c in shot.floor))
    im.paste(cat, (round(cx - cat.width / 2), round(cy - cat.height / 2)), cat)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def main(out_dir: str | Path | None = None) -> list[Path]:
    """Write every shot as ``<out_dir>/<name>.png`` (default ``assets/subject``)."""
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "subject"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shot in SHOTS:
        path = out / f"{shot.name}.png"
        render(shot).save(path, optimize=False)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in main(sys.argv[1] if len(sys.argv) > 1 else None):
        print(p)
