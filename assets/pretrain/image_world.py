"""The image world: procedural 64 px captioned scenes for pretraining ``mini-sd``.

Every scene is drawn with PIL in the flat, ink-outlined style of ``assets/subject/`` (drawn at
4x and downsampled, as ``assets/make_subject.py`` does) and is a pure function of its index and
the world seed: ``scene(i)`` returns the same pixels, caption and attributes on every machine.

A scene shows ``count`` (one..four) objects of one ``kind`` (:data:`KINDS`), one ``colour``
(:data:`COLOURS`) and one ``size`` (small / big), grouped on the ``left`` / ``centre`` /
``right``, on one ``background`` (:data:`BACKGROUNDS`). Captions name the kind, count, colour
and background always and the size and position often, e.g. "a photo of two red balls on the
beach", so a text-to-image model can only match the data by reading the text.

The world never draws the demo subject (the toy cat, ``assets/subject/``) nor uses the
identifier ``sks``: DreamBooth on the cat must teach the model something it has not seen.
:func:`subject_image` draws *other* novel subjects (toy dog, toy robot, toy duck), which also
never appear in :func:`scene`, for the DreamBooth-in-miniature protocol, and :data:`PROMPTS` is
that protocol's fixed prompt set.

Held-out combinations: ``split="test"`` scenes use only (kind, colour, background) triples
that ``split="train"`` scenes never use (:func:`is_heldout`), for compositional checks.

World version 2 (``version=2``, ``--world_version 2``; opt-in, version 1 is unchanged) adds a
studio backdrop ("in a studio") and animal toys of eight species, two poses, two facings and six
secondary colours in place of the one teddy sprite: see ``WORLD_V2.md``.

Usage: ``python assets/pretrain/image_world.py --out DIR --n N [--seed S] [--split train] [--world_version 1]``
writes ``DIR/00000.png ...`` and ``DIR/metadata.jsonl`` (``file_name``, ``text`` and the
attributes; the layout diffusers' imagefolder and ``train/dreambooth_dash.py --caption_column
text`` read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _atomic import save_folder_atomic  # noqa: E402  (torch-free, like this module)

SIZE = 64
SS = 4  # draw at 4x and downsample: PIL's primitives are not anti-aliased.
INK = (30, 24, 20)
WHITE = (255, 255, 255)

KINDS: tuple[str, ...] = ("ball", "box", "tree", "house", "car", "flower", "cup", "boat", "toy")
# Plural forms for captions ("two boxes", "three toys").
PLURALS: dict[str, str] = {k: k + "s" for k in KINDS} | {"box": "boxes"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 48, 44),
    "orange": (240, 140, 40),
    "yellow": (246, 214, 52),
    "green": (64, 170, 70),
    "blue": (50, 100, 210),
    "purple": (140, 70, 180),
    "pink": (240, 140, 180),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "big")
COUNTS: tuple[str, ...] = ("one", "two", "three", "four")
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
# Caption phrase of each background ("a photo of a red ball on the beach").
BACKGROUNDS: dict[str, str] = {
    "grass": "on the grass",
    "beach": "on the beach",
    "snow": "in the snow",
    "indoors": "indoors",
    "night": "at night",
    "street": "on the street",
}
# Words the world must never produce: the demo subject and the DreamBooth identifier.
FORBIDDEN_WORDS: tuple[str, ...] = ("sks", "cat")

# World version 2 (opt-in; version 1 stays bit-identical, see WORLD_V2.md): the plain backdrop of
# DreamBooth instance images as a background with its own phrase, and a "toy" class that varies
# like DreamBooth subjects do (species, pose, facing, secondary colour).
WORLD_VERSIONS: tuple[int, ...] = (1, 2)
STUDIO_PHRASE = "in a studio"
BACKGROUNDS_V2: dict[str, str] = BACKGROUNDS | {"studio": STUDIO_PHRASE}
# Animal toys of version 2. Never a cat (the demo subject stays unseen); the dog and the duck are
# drawn unlike the held-out toydog / toyduck of subject_image (no collar, no sailor hat, any colour).
TOY_SPECIES: tuple[str, ...] = ("bear", "dog", "rabbit", "duck", "frog", "mouse", "pig", "owl")
TOY_PLURALS: dict[str, str] = {"mouse": "mice"}  # "three toy mice"; the others add an s
TOY_POSES: tuple[str, ...] = ("sitting", "standing")
TOY_FACINGS: tuple[str, ...] = ("left", "right")
# Secondary colour of a toy's belly, ears and snout: a fixed colour or a shade of the body colour.
TOY_ACCENTS: dict[str, tuple[int, int, int] | float] = {
    "cream": (250, 232, 200), "pink": (246, 176, 196), "tan": (200, 160, 110), "grey": (190, 190, 196),
    "light": 1.35, "dark": 0.65,
}


# --------------------------------------------------------------------------- backgrounds


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(v * f))) for v in c)  # type: ignore[return-value]


def _draw_studio(d: ImageDraw.ImageDraw, big: int, rng: random.Random) -> float:
    """A plain backdrop and floor in random light / mid tones (as ``assets/subject``); returns the
    floor line, 0.72 of the height (92 / 128 px there)."""
    d.rectangle([0, 0, big, big], fill=tuple(rng.randint(195, 245) for _ in range(3)))
    d.rectangle([0, round(big * 0.72), big, big], fill=tuple(rng.randint(100, 200) for _ in range(3)))
    return 0.72


def _draw_background(d: ImageDraw.ImageDraw, name: str, big: int, rng: random.Random) -> float:
    """Paint the background; return the horizon height as a fraction of the image."""
    horizon = rng.uniform(0.55, 0.65)
    h = round(big * horizon)
    if name == "grass":
        d.rectangle([0, 0, big, h], fill=(170, 215, 245))
        d.ellipse([big * 0.75, big * 0.05, big * 0.92, big * 0.22], fill=(255, 230, 90))
        d.rectangle([0, h, big, big], fill=(96, 170, 80))
        for _ in range(14):  # grass tufts
            x, y = rng.uniform(0, big), rng.uniform(h + 4, big)
            d.line([(x, y), (x - 3 * SS, y - 5 * SS)], fill=(60, 130, 50), width=SS)
    elif name == "beach":
        d.rectangle([0, 0, big, h], fill=(180, 220, 250))
        sea = round(big * (horizon - 0.12))
        d.rectangle([0, sea, big, h], fill=(40, 130, 200))
        d.rectangle([0, h, big, big], fill=(238, 214, 160))
        d.ellipse([big * 0.08, big * 0.05, big * 0.24, big * 0.21], fill=(255, 220, 80))
    elif name == "snow":
        d.rectangle([0, 0, big, h], fill=(200, 210, 225))
        d.rectangle([0, h, big, big], fill=(248, 250, 255))
        for _ in range(22):  # falling snow
            x, y, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(1, 2.2) * SS
            d.ellipse([x - r, y - r, x + r, y + r], fill=WHITE)
    elif name == "indoors":
        wall = rng.choice([(236, 222, 196), (214, 226, 236), (232, 214, 222)])
        d.rectangle([0, 0, big, h], fill=wall)
        wx = rng.uniform(0.1, 0.6) * big  # a window
        d.rectangle([wx, big * 0.1, wx + big * 0.28, big * 0.36], fill=(180, 215, 245), outline=INK, width=SS)
        d.line([(wx + big * 0.14, big * 0.1), (wx + big * 0.14, big * 0.36)], fill=INK, width=SS)
        d.rectangle([0, h, big, big], fill=(160, 110, 70))
        for k in range(1, 5):  # floor boards
            y = h + (big - h) * k / 5
            d.line([(0, y), (big, y)], fill=(130, 88, 56), width=SS)
    elif name == "night":
        d.rectangle([0, 0, big, h], fill=(20, 28, 70))
        d.ellipse([big * 0.72, big * 0.06, big * 0.86, big * 0.2], fill=(245, 240, 200))
        for _ in range(10):
            x, y = rng.uniform(0, big), rng.uniform(0, h * 0.8)
            d.ellipse([x - SS, y - SS, x + SS, y + SS], fill=(250, 250, 220))
        d.rectangle([0, h, big, big], fill=(36, 52, 50))
    elif name == "studio":  # version 2: the plain backdrop of assets/subject and subject_image
        horizon = _draw_studio(d, big, rng)  # in place of the horizon drawn above
    elif name == "street":
        d.rectangle([0, 0, big, h], fill=(190, 210, 230))
        for _ in range(3):  # city blocks behind
            x = rng.uniform(0, big * 0.8)
            top = rng.uniform(0.15, 0.4) * big
            d.rectangle([x, top, x + big * 0.2, h], fill=(150, 150, 165), outline=INK, width=SS)
        d.rectangle([0, h, big, big], fill=(96, 96, 104))
        y = (h + big) / 2
        for x in range(0, big, 16 * SS):  # lane markings
            d.rectangle([x, y - SS, x + 8 * SS, y + SS], fill=(240, 230, 120))
    else:
        raise ValueError(f"unknown background {name!r}; valid: {', '.join(BACKGROUNDS_V2)}")
    return horizon


# --------------------------------------------------------------------------- objects


def _draw_object(d: ImageDraw.ImageDraw, kind: str, colour: tuple[int, int, int],
                 x: float, y: float, s: float) -> None:
    """Draw one ``kind`` with its base centre at (x, y) (the floor contact) and size ``s`` px."""
    w = max(SS, round(s / 28))
    dark = _shade(colour, 0.72)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        # Coordinates in units of s, relative to the base centre, y up (negative is higher).
        return [x + x0 * s, y + y0 * s, x + x1 * s, y + y1 * s]

    def pts(*xy: float) -> list[tuple[float, float]]:
        return [(x + xy[i] * s, y + xy[i + 1] * s) for i in range(0, len(xy), 2)]

    # Contact shadow, as in the subject images.
    d.ellipse(box(-0.45, -0.05, 0.45, 0.05), fill=(0, 0, 0, 60))
    if kind == "ball":
        d.ellipse(box(-0.45, -0.9, 0.45, 0), fill=colour, outline=INK, width=w)
        d.arc(box(-0.45, -0.75, 0.45, -0.15), 200, 340, fill=dark, width=w)
        d.ellipse(box(-0.25, -0.75, -0.1, -0.6), fill=WHITE)
    elif kind == "box":
        d.polygon(pts(-0.45, -0.7, -0.2, -0.9, 0.5, -0.9, 0.25, -0.7), fill=_shade(colour, 1.15), outline=INK)
        d.polygon(pts(0.25, -0.7, 0.5, -0.9, 0.5, -0.2, 0.25, 0), fill=dark, outline=INK)
        d.rectangle(box(-0.45, -0.7, 0.25, 0), fill=colour, outline=INK, width=w)
    elif kind == "tree":
        d.rectangle(box(-0.08, -0.45, 0.08, 0), fill=(120, 80, 40), outline=INK, width=w)
        d.ellipse(box(-0.42, -1.0, 0.42, -0.3), fill=colour, outline=INK, width=w)
        d.ellipse(box(-0.2, -0.85, -0.02, -0.7), fill=_shade(colour, 1.2))
    elif kind == "house":
        d.rectangle(box(-0.4, -0.55, 0.4, 0), fill=colour, outline=INK, width=w)
        d.polygon(pts(-0.5, -0.55, 0, -0.95, 0.5, -0.55), fill=(150, 60, 50), outline=INK)
        d.rectangle(box(-0.1, -0.3, 0.1, 0), fill=(110, 70, 40), outline=INK, width=w)
        d.rectangle(box(0.18, -0.42, 0.32, -0.28), fill=(200, 230, 250), outline=INK, width=w)
    elif kind == "car":
        d.rounded_rectangle(box(-0.5, -0.42, 0.5, -0.1), radius=0.08 * s, fill=colour, outline=INK, width=w)
        d.polygon(pts(-0.28, -0.42, -0.16, -0.65, 0.2, -0.65, 0.32, -0.42), fill=colour, outline=INK)
        d.polygon(pts(-0.2, -0.44, -0.12, -0.6, 0.02, -0.6, 0.02, -0.44), fill=(200, 230, 250))
        for cx in (-0.3, 0.3):
            d.ellipse(box(cx - 0.12, -0.22, cx + 0.12, 0.02), fill=INK)
            d.ellipse(box(cx - 0.05, -0.15, cx + 0.05, -0.05), fill=(180, 180, 180))
    elif kind == "flower":
        d.line(pts(0, 0, 0, -0.55), fill=(50, 130, 50), width=2 * w)
        d.ellipse(box(0, -0.35, 0.25, -0.22), fill=(70, 160, 60))
        # Petals without ink outlines: at the smallest sizes an outline would hide the colour.
        for dx, dy in ((-0.19, -0.74), (0.19, -0.74), (0, -0.92), (0, -0.54), (-0.17, -0.6), (0.17, -0.6)):
            d.ellipse(box(dx - 0.17, dy - 0.17, dx + 0.17, dy + 0.17), fill=colour)
        d.ellipse(box(-0.1, -0.82, 0.1, -0.62), fill=(250, 210, 60), outline=INK, width=w)
    elif kind == "cup":
        d.arc(box(0.15, -0.55, 0.52, -0.18), 270, 90, fill=INK, width=3 * w)
        d.polygon(pts(-0.35, -0.65, 0.35, -0.65, 0.28, 0, -0.28, 0), fill=colour, outline=INK)
        d.ellipse(box(-0.35, -0.71, 0.35, -0.59), fill=dark, outline=INK, width=w)
    elif kind == "boat":
        d.line(pts(0, -0.3, 0, -1.0), fill=INK, width=w)
        d.polygon(pts(0.03, -0.95, 0.03, -0.38, 0.42, -0.38), fill=WHITE, outline=INK)
        d.polygon(pts(-0.5, -0.3, 0.5, -0.3, 0.32, 0, -0.32, 0), fill=colour, outline=INK)
    elif kind == "toy":  # a teddy bear: the world's generic "toy", so "sks toy" has a class prior
        for ex in (-0.22, 0.22):
            d.ellipse(box(ex - 0.1, -0.98, ex + 0.1, -0.78), fill=colour, outline=INK, width=w)
        d.ellipse(box(-0.32, -0.55, 0.32, 0), fill=colour, outline=INK, width=w)
        d.ellipse(box(-0.15, -0.4, 0.15, -0.08), fill=_shade(colour, 1.25))
        d.ellipse(box(-0.28, -0.92, 0.28, -0.45), fill=colour, outline=INK, width=w)
        for ex in (-0.1, 0.1):
            d.ellipse(box(ex - 0.035, -0.76, ex + 0.035, -0.68), fill=INK)
        d.ellipse(box(-0.05, -0.64, 0.05, -0.57), fill=INK)
    else:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")


ORANGE = (245, 130, 30)


class _Grid:
    """A transparent ``px`` square for a sprite laid out on a 100x100 grid (the subjects' and the
    version-2 toys'): ``box`` / ``pts`` turn grid coordinates into pixels, ``w`` is the ink width."""

    def __init__(self, px: int) -> None:
        self.im = Image.new("RGBA", (px, px), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.im)
        self.u = px / 100
        self.w = max(1, round(2 * self.u))

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * self.u, y0 * self.u, x1 * self.u, y1 * self.u]

    def pts(self, *xy: float) -> list[tuple[float, float]]:
        return [(xy[i] * self.u, xy[i + 1] * self.u) for i in range(0, len(xy), 2)]


def _toy_accent(body: tuple[int, int, int], accent: str) -> tuple[int, int, int]:
    a = TOY_ACCENTS[accent]
    return _shade(body, a) if isinstance(a, float) else a


def _toy_sprite(species: str, pose: str, body: tuple[int, int, int], accent: tuple[int, int, int],
                px: int) -> Image.Image:
    """A version-2 animal toy on a transparent ``px`` square, facing right, feet on y = 96 of a
    100x100 grid: the flat, ink-outlined style of ``_subject_sprite`` and ``assets/subject``."""
    g = _Grid(px)
    im, d, u, w, box, pts = g.im, g.draw, g.u, g.w, g.box, g.pts

    def oval(x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int], ink: bool = True) -> None:
        d.ellipse(box(x0, y0, x1, y1), fill=fill, outline=INK if ink else None, width=w)

    def eyes(xs: tuple[float, float], y: float, r: float = 4.0) -> None:
        for x in xs:  # toy eyes with a glint, as the subjects have
            d.ellipse(box(x - r, y - 1.2 * r, x + r, y + 1.2 * r), fill=INK)
            d.ellipse(box(x - 0.6 * r, y - 0.9 * r, x - 0.1 * r, y - 0.4 * r), fill=WHITE)

    dark = _shade(body, 0.72)
    bird = species in ("duck", "owl")
    sitting = pose == "sitting"
    # Behind the body: tails and long ears.
    if species == "dog":
        d.line(pts(30, 70, 16, 56, 14, 46), fill=body, width=round(6 * u), joint="curve")
    elif species == "mouse":
        d.line(pts(28, 84, 10, 88, 6, 74, 12, 64), fill=accent, width=round(3 * u), joint="curve")
    elif species == "pig":
        d.arc(box(10, 58, 26, 74), 0, 300, fill=accent, width=round(3 * u))
    elif species == "rabbit":
        for x in (36, 56):
            oval(x, 0, x + 13, 32, body)
            oval(x + 3.5, 5, x + 9.5, 27, accent, ink=False)
        oval(14, 70, 30, 86, accent)  # cotton tail
    elif species == "duck":
        d.polygon(pts(26, 64, 14, 52, 30, 56), fill=body, outline=INK)
    # Legs and body: sitting toys are round with feet forward, standing toys taller on two legs.
    if species == "owl":
        torso = (22, 14, 78, 92) if sitting else (26, 10, 74, 84)
    else:
        torso = (24, 50, 76, 90) if sitting else (30, 44, 70, 82)
    if not sitting:
        for x in (36, 52):
            if bird:
                d.line(pts(x + 6, 78, x + 6, 94), fill=ORANGE, width=round(3 * u))
            else:
                d.rounded_rectangle(box(x, 72, x + 12, 96), radius=4 * u, fill=body, outline=INK, width=w)
    oval(*torso, body)
    cx, top, bottom = (torso[0] + torso[2]) / 2, torso[1], torso[3]
    hw = (torso[2] - torso[0]) / 2
    oval(cx - hw * 0.5, top + (bottom - top) * 0.3, cx + hw * 0.5, bottom - 2, accent, ink=False)  # belly
    if species == "owl":
        for k in range(3):  # breast feathers
            y = top + (bottom - top) * (0.48 + 0.12 * k)
            d.arc(box(cx - 6, y - 4, cx + 6, y + 4), 20, 160, fill=dark, width=w)
    if sitting or bird:
        for x in ((28, 56) if sitting else (34, 52)):
            oval(x, 86, x + 16, 96, ORANGE if bird else body)
    # Arms (wings for birds).
    if species == "duck":
        d.chord(box(30, top + 8, 62, top + 30), 0, 180, fill=dark, outline=INK, width=w)
    elif species == "owl":
        for x in (torso[0] - 6, torso[2] - 10):
            oval(x, top + 30, x + 16, top + 66, dark)
    else:
        for x in ((18, 68) if sitting else (20, 66)):
            oval(x, top + 8, x + 14, top + 26, body)
    # Head and face (facing right: the snout, beak and pupils sit right of centre).
    if species == "owl":
        for xs in ((28, 34, 44), (56, 66, 72)):  # ear tufts
            d.polygon(pts(xs[0], top + 8, xs[1], top - 8, xs[2], top + 4), fill=body, outline=INK)
        oval(30, top + 6, 72, top + 38, accent, ink=False)  # face disc
        for x in (40, 60):
            oval(x - 8, top + 12, x + 8, top + 28, WHITE)
        eyes((43, 63), top + 20, 3.5)
        d.polygon(pts(50, top + 28, 58, top + 28, 54, top + 36), fill=ORANGE, outline=INK)
        return im
    if species == "bear":
        for x in (30, 64):
            oval(x, 6, x + 16, 22, body)
            oval(x + 4, 10, x + 12, 18, accent, ink=False)
    elif species == "mouse":
        for x in (20, 62):
            oval(x, 0, x + 26, 26, body)
            oval(x + 5, 5, x + 21, 21, accent, ink=False)
    elif species == "pig":
        for x in (32, 60):  # ears flopped forward (upright pointed ears would read as a cat's)
            d.polygon(pts(x, 14, x + 10, 4, x + 18, 20), fill=accent, outline=INK)
    elif species == "frog":
        for x in (32, 58):
            oval(x, 6, x + 18, 26, body)
    head = {"rabbit": (32, 20, 80, 56), "duck": (38, 8, 76, 46), "frog": (24, 16, 84, 52)}.get(species, (30, 10, 80, 50))
    oval(*head, body)
    if species == "bear":
        oval(52, 30, 74, 46, accent, ink=False)
        d.ellipse(box(64, 30, 72, 36), fill=INK)
        eyes((46, 62), 24)
    elif species == "dog":
        for x in (24, 70):  # floppy ears in the accent colour (the held-out toydog's are dark brown)
            d.ellipse(box(x, 18, x + 12, 48), fill=accent, outline=INK, width=w)
        oval(60, 28, 90, 46, accent)  # a long muzzle
        d.ellipse(box(82, 29, 90, 36), fill=INK)
        eyes((44, 60), 24)
    elif species == "rabbit":
        eyes((48, 64), 34)
        d.polygon(pts(70, 42, 76, 42, 73, 46), fill=(240, 140, 160), outline=INK)
    elif species == "duck":
        d.polygon(pts(72, 24, 96, 30, 72, 36), fill=ORANGE, outline=INK)
        eyes((52, 64), 20)
    elif species == "frog":
        for x in (41, 67):  # eyes on top bumps
            oval(x - 6, 10, x + 6, 22, WHITE)
        eyes((43, 69), 16, 3)
        d.arc(box(38, 28, 76, 44), 20, 160, fill=INK, width=w)
    elif species == "mouse":
        d.polygon(pts(72, 26, 92, 34, 72, 42), fill=body, outline=INK)
        d.ellipse(box(88, 30, 95, 37), fill=INK)
        eyes((48, 64), 24)
    elif species == "pig":
        oval(62, 28, 82, 44, accent)
        for x in (67, 74):
            d.ellipse(box(x, 33, x + 3, 38), fill=INK)
        eyes((44, 58), 22)
    else:
        raise ValueError(f"unknown toy species {species!r}; valid: {', '.join(TOY_SPECIES)}")
    return im


def _draw_toy_v2(im: Image.Image, d: ImageDraw.ImageDraw, attrs: dict[str, Any], x: float, y: float,
                 s: float) -> None:
    """Paste one version-2 toy with its feet centred on (x, y) and height ~``s`` px (4x canvas)."""
    d.ellipse([x - 0.4 * s, y - 0.05 * s, x + 0.4 * s, y + 0.05 * s], fill=(0, 0, 0, 60))  # contact shadow
    px = max(8, round(s * 1.05))
    body = COLOURS[attrs["colour"]]
    sprite = _toy_sprite(attrs["species"], attrs["pose"], body, _toy_accent(body, attrs["accent"]), px)
    if attrs["facing"] == "left":
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im.paste(sprite, (round(x - px / 2), round(y - px * 0.96)), sprite)


# --------------------------------------------------------------------------- scenes


def is_heldout(kind: str, colour: str, background: str) -> bool:
    """True for the (kind, colour, background) triples reserved for ``split="test"`` (~1 in 7)."""
    key = f"{kind}|{colour}|{background}".encode()
    return hashlib.sha256(key).digest()[0] % 7 == 0


def _rng(index: int, seed: int, salt: str = "") -> random.Random:
    # String seeds are hashed with SHA-512 by random.seed: stable across runs and platforms,
    # unaffected by PYTHONHASHSEED.
    return random.Random(f"image-world:{seed}:{salt}:{index}")


# Version 2's mix: a third of scenes show toys (the DreamBooth class); the studio backdrop for 40 %
# of toy scenes (DreamBooth instance images are studio shots) and 15 % of the others; half the toy
# scenes are one big toy in the centre (subjects fill the frame); a quarter of toy captions name
# the species ("a red toy bear"), the rest say only "toy" (the class word of the instance prompt).
V2_TOY_SHARE = 0.25  # drawn before the uniform kind: 0.25 + 0.75 / 9 = 1 / 3 of scenes are toys
V2_STUDIO = {"toy": 0.4, "other": 0.15}
V2_CLOSEUP = 0.5
V2_SAY_SPECIES = 0.25


def _check(split: str, version: int) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if version not in WORLD_VERSIONS:
        raise ValueError(f"world version must be one of {WORLD_VERSIONS}, got {version!r}")


def _sample_attributes_v2(index: int, seed: int, split: str) -> dict[str, Any]:
    rng = _rng(index, seed, f"v2:{split}")  # its own stream: version 1's scenes are not reused
    while True:
        kind = "toy" if rng.random() < V2_TOY_SHARE else rng.choice(KINDS)
        colour = rng.choice(list(COLOURS))
        studio = rng.random() < V2_STUDIO["toy" if kind == "toy" else "other"]
        bg = "studio" if studio else rng.choice(list(BACKGROUNDS))
        if is_heldout(kind, colour, bg) == (split == "test"):
            break
    attrs: dict[str, Any] = {
        "kind": kind, "colour": colour, "size": rng.choice(SIZES), "count": rng.randint(1, 4),
        "position": rng.choice(POSITIONS), "background": bg,
        "say_size": rng.random() < 0.6, "say_position": rng.random() < 0.5,
    }
    if kind == "toy":
        closeup = rng.random() < V2_CLOSEUP
        if closeup:
            attrs.update(count=1, size="big", position="centre")
        attrs.update(species=rng.choice(TOY_SPECIES), pose=rng.choice(TOY_POSES), facing=rng.choice(TOY_FACINGS),
                     accent=rng.choice(list(TOY_ACCENTS)), closeup=closeup,
                     say_species=rng.random() < V2_SAY_SPECIES)
    return attrs


def sample_attributes(index: int, seed: int = 0, split: str = "train", version: int = 1) -> dict[str, Any]:
    """The attributes of scene ``index`` (no drawing): kind, colour, size, count, position, background;
    version-2 toys also species, pose, facing, accent, closeup and say_species."""
    _check(split, version)
    if version == 2:
        return _sample_attributes_v2(index, seed, split)
    rng = _rng(index, seed, split)
    while True:  # rejection keeps the two splits' triples disjoint
        kind, colour, bg = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        if is_heldout(kind, colour, bg) == (split == "test"):
            break
    return {
        "kind": kind,
        "colour": colour,
        "size": rng.choice(SIZES),
        "count": rng.randint(1, 4),
        "position": rng.choice(POSITIONS),
        "background": bg,
        # Which optional words the caption carries (drawn here so the caption is part of the sample).
        "say_size": rng.random() < 0.6,
        "say_position": rng.random() < 0.5,
    }


def caption(attrs: dict[str, Any]) -> str:
    """The caption of a scene with ``attrs``: "a photo of two small red balls on the beach, on the left"."""
    n = attrs["count"]
    noun = attrs["kind"] if n == 1 else PLURALS[attrs["kind"]]
    if attrs.get("say_species"):  # version 2: "a red toy bear", "two red toy bears"
        noun = "toy " + (attrs["species"] if n == 1 else TOY_PLURALS.get(attrs["species"], attrs["species"] + "s"))
    words = ["a" if n == 1 else COUNTS[n - 1]]
    if attrs.get("say_size", True):
        words.append(attrs["size"])
    words += [attrs["colour"], noun, BACKGROUNDS_V2[attrs["background"]]]
    text = "a photo of " + " ".join(words)
    if attrs.get("say_position", True):
        text += ", in the centre" if attrs["position"] == "centre" else f", on the {attrs['position']}"
    return text


def drop_attribute_words(text: str, colour: bool = False, background: bool = False) -> str:
    """``text`` (a :func:`caption`) without its colour word and / or its background phrase.

    Pretraining on such shortened captions teaches the model what a prompt that leaves a property
    open should draw (any colour, some background), as DreamBooth's "a photo of sks toy" does.
    """
    words = text.split(" ")
    if colour:
        words = [w for w in words if w not in COLOURS]
    out = " ".join(words)
    if background:
        for phrase in BACKGROUNDS_V2.values():  # version 1 captions never hold the studio phrase
            out = out.replace(" " + phrase, "", 1)
    return out


def render(attrs: dict[str, Any], index: int = 0, seed: int = 0, size: int = SIZE) -> Image.Image:
    """Draw a ``size`` px RGB scene with ``attrs``; layout jitter comes from (index, seed).

    Version-2 toys (``attrs`` with a ``species``) are pasted sprites; a ``closeup`` toy fills 52-68 %
    of the image height, as DreamBooth subjects do."""
    rng = _rng(index, seed, "layout")
    big = size * SS
    im = Image.new("RGB", (big, big))
    d = ImageDraw.Draw(im, "RGBA")
    horizon = _draw_background(d, attrs["background"], big, rng)
    n = attrs["count"]
    # Object height as a fraction of the image: size first, shrunk a little for crowded scenes.
    s = (0.46 if attrs["size"] == "big" else 0.24) * (1.0, 0.8, 0.68, 0.6)[n - 1] * rng.uniform(0.92, 1.08)
    gap = s * 1.05
    width = gap * (n - 1)
    if width + s > 0.92:  # a big group of four would leave the frame: shrink it to fit
        f = 0.92 / (width + s)
        s, gap, width = s * f, gap * f, width * f
    centre = {"left": 0.27, "centre": 0.5, "right": 0.73}[attrs["position"]] + rng.uniform(-0.04, 0.04)
    # Keep the whole group in the frame (a big group of four spans most of the width).
    half = width / 2 + s * 0.5
    centre = min(max(centre, half + 0.02), 0.98 - half)
    base_y = rng.uniform(horizon + 0.12, 0.9)
    if attrs.get("closeup"):  # version 2 only (extra draws): keep the tall toy's head in the frame
        s = rng.uniform(0.52, 0.68)
        base_y = rng.uniform(max(horizon + 0.12, s + 0.2), 0.94)
    for k in range(n):
        x = centre - width / 2 + k * gap + rng.uniform(-0.02, 0.02)
        y = base_y + (0.03 if k % 2 else 0.0) + rng.uniform(-0.01, 0.01)
        if "species" in attrs:
            _draw_toy_v2(im, d, attrs, x * big, min(y, 0.97) * big, s * big)
        else:
            _draw_object(d, attrs["kind"], COLOURS[attrs["colour"]], x * big, min(y, 0.97) * big, s * big)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def scene(index: int, seed: int = 0, split: str = "train",
          version: int = 1) -> tuple[Image.Image, str, dict[str, Any]]:
    """Scene ``index`` of the world ``seed`` (world ``version``): ``(64 px RGB image, caption, attributes)``."""
    attrs = sample_attributes(index, seed, split, version)
    return render(attrs, index, seed), caption(attrs), attrs


# --------------------------------------------------------------------------- DreamBooth subjects

# Novel subjects for the DreamBooth-in-miniature protocol, drawn like the toy cat (big toy eyes,
# ink outlines, one distinctive accessory). Identity colours are fixed per subject.
SUBJECTS: tuple[str, ...] = ("toydog", "toyrobot", "toyduck")


def _subject_sprite(name: str, px: int, tint: tuple[int, int, int] | None) -> Image.Image:
    """The subject on a transparent ``px`` square, facing right, laid out on a 100x100 grid."""
    g = _Grid(px)
    im, d, u, w, box, pts = g.im, g.draw, g.u, g.w, g.box, g.pts

    def eyes(xs: tuple[float, float], y: float) -> None:
        for x in xs:
            d.ellipse(box(x, y, x + 9, y + 11), fill=INK)
            d.ellipse(box(x + 2, y + 2, x + 5, y + 5), fill=WHITE)

    if name == "toydog":
        body = tint or (150, 100, 60)
        d.ellipse(box(22, 48, 78, 90), fill=body, outline=INK, width=w)
        d.ellipse(box(38, 60, 62, 88), fill=(240, 220, 190))
        for x in (28, 58):
            d.ellipse(box(x, 82, x + 14, 94), fill=body, outline=INK, width=w)
        d.line(pts(24, 66, 12, 54), fill=body, width=round(6 * u))
        d.rectangle(box(34, 44, 70, 51), fill=(220, 40, 40))  # red collar with a gold tag
        d.ellipse(box(50, 49, 57, 56), fill=(240, 200, 40), outline=INK)
        d.ellipse(box(30, 8, 80, 50), fill=body, outline=INK, width=w)
        for x in (24, 74):  # floppy ears
            d.ellipse(box(x, 12, x + 12, 40), fill=(90, 60, 40), outline=INK, width=w)
        eyes((42, 58), 20)
        d.ellipse(box(50, 34, 60, 41), fill=INK)
    elif name == "toyrobot":
        body = tint or (150, 160, 175)
        d.line(pts(50, 14, 50, 4), fill=INK, width=w)
        d.ellipse(box(46, 0, 54, 8), fill=(230, 50, 50))
        d.rectangle(box(30, 14, 72, 44), fill=body, outline=INK, width=w)
        d.rectangle(box(26, 48, 76, 84), fill=body, outline=INK, width=w)
        d.rectangle(box(40, 56, 62, 70), fill=(60, 200, 200), outline=INK, width=w)  # teal chest screen
        for x in (30, 58):
            d.rectangle(box(x, 84, x + 14, 96), fill=_shade(body, 0.7), outline=INK, width=w)
        for x in (16, 78):
            d.rectangle(box(x, 50, x + 8, 76), fill=_shade(body, 0.85), outline=INK, width=w)
        eyes((38, 56), 20)
        d.rectangle(box(42, 36, 60, 39), fill=INK)
    elif name == "toyduck":
        body = tint or (250, 215, 50)
        d.ellipse(box(18, 50, 82, 92), fill=body, outline=INK, width=w)
        d.arc(box(26, 58, 60, 84), 160, 340, fill=_shade(body, 0.75), width=round(3 * u))
        d.ellipse(box(36, 12, 76, 52), fill=body, outline=INK, width=w)
        d.polygon(pts(74, 30, 94, 34, 74, 40), fill=ORANGE, outline=INK)
        d.rectangle(box(38, 8, 74, 16), fill=(40, 70, 160), outline=INK, width=w)  # blue sailor hat
        d.rectangle(box(46, 0, 66, 10), fill=(40, 70, 160), outline=INK, width=w)
        eyes((46, 60), 20)
        for x in (34, 56):
            d.ellipse(box(x, 88, x + 16, 96), fill=ORANGE, outline=INK, width=w)
    else:
        raise ValueError(f"unknown subject {name!r}; valid: {', '.join(SUBJECTS)}")
    return im


def subject_image(name: str, shot: int, background: str | None = None,
                  tint: str | None = None, size: int = SIZE) -> Image.Image:
    """Subject ``name`` in pose ``shot`` (any int: scale, position, tilt and mirror vary) on
    ``background`` (default: a plain studio backdrop as in ``assets/subject``) or a world background.

    ``tint`` recolours the subject's body with a :data:`COLOURS` name (for property prompts'
    references). Deterministic in all arguments.
    """
    rng = random.Random(f"subject:{name}:{shot}:{background}")
    big = size * SS
    im = Image.new("RGB", (big, big))
    d = ImageDraw.Draw(im, "RGBA")
    horizon = _draw_studio(d, big, rng) if background is None else _draw_background(d, background, big, rng)
    scale = rng.uniform(0.45, 0.7)
    px = round(big * scale)
    sprite = _subject_sprite(name, px, COLOURS[tint] if tint else None)
    if rng.random() < 0.5:
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sprite = sprite.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BICUBIC, expand=True)
    cx = rng.uniform(0.35, 0.65) * big
    foot = rng.uniform(max(horizon + 0.1, 0.75), 0.95) * big
    d.ellipse([cx - px * 0.3, foot - px * 0.04, cx + px * 0.3, foot + px * 0.04], fill=(0, 0, 0, 60))
    im.paste(sprite, (round(cx - sprite.width / 2), round(foot - sprite.height * 0.95)), sprite)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def _prompt_set() -> tuple[dict[str, Any], ...]:
    out: list[dict[str, Any]] = []
    for bg in ("beach", "snow", "night", "indoors", "grass", "street"):  # recontextualisation
        out.append({"prompt": f"a photo of sks toy {BACKGROUNDS[bg]}", "type": "context", "background": bg})
    for colour in ("red", "blue", "green", "purple"):  # property change
        out.append({"prompt": f"a {colour} sks toy", "type": "property", "colour": colour})
    return tuple(out)


# The protocol's fixed prompts, with the attributes a prompt-fidelity classifier checks.
PROMPTS: tuple[dict[str, Any], ...] = _prompt_set()
INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"


def write_subject(name: str, out: str | os.PathLike[str], shots: int = 5) -> list[Path]:
    """Write ``shots`` instance images of subject ``name`` (plain backdrops) as PNGs into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shots):
        p = folder / f"{name}_{k}.png"
        subject_image(name, k).save(p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- dataset writer


def write_dataset(out: str | os.PathLike[str], n: int, seed: int = 0, split: str = "train",
                  progress: Callable[[int], None] | None = None, version: int = 1) -> Path:
    """Write scenes 0..n-1 as PNGs plus ``metadata.jsonl`` into ``out`` (must not exist yet).

    Written into a temporary sibling folder and renamed at the end: an interrupted run never
    leaves a partial dataset under ``out``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check(split, version)

    def write(tmp: Path) -> None:
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for i in range(n):
                image, text, attrs = scene(i, seed, split, version)
                name = f"{i:05d}.png"
                image.save(tmp / name)
                meta.write(json.dumps({"file_name": name, "text": text, **attrs}) + "\n")
                if progress:
                    progress(i)

    return save_folder_atomic(out, write)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Write N scenes of the image world (PNG + metadata.jsonl).")
    p.add_argument("--out", required=True, help="new folder to create")
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--world_version", type=int, choices=WORLD_VERSIONS, default=1,
                   help="1: the first world; 2: adds varied animal toys and a studio backdrop (WORLD_V2.md)")
    p.add_argument("--subjects_out", default=None,
                   help="also write 5 instance images of each DreamBooth subject into SUBJECTS_OUT/<name>/")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    out = write_dataset(args.out, args.n, args.seed, args.split, version=args.world_version)
    if args.subjects_out:
        for name in SUBJECTS:
            write_subject(name, Path(args.subjects_out) / name)
    print(f"wrote {args.n} scenes to {out}")
    return out


if __name__ == "__main__":
    main()
