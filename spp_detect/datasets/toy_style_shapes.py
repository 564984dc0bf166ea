"""Shape styles of the toy VOC generator's instance-split mode: four per class, plus distractors.

Shapes are layered contours in a unit frame (``[-1, 1]`` extent): a list of
``(vertices float64[K, 2], value)`` filled in order with ``value`` 1 (the object's fill),
0 (a hole) or 2 (a detail painted in a contrasting colour). :data:`CLASS_STYLES` gives each
class two training styles and two test styles (``datasets/toy_styles.py`` splits them);
:data:`DISTRACTOR_STYLES` are shapes of no class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["Layers", "FILL", "HOLE", "DETAIL", "ShapeStyle", "CLASS_STYLES", "DISTRACTOR_STYLES"]

Layers = List[Tuple[np.ndarray, int]]
FILL, HOLE, DETAIL = 1, 0, 2


@dataclass(frozen=True)
class ShapeStyle:
    """One way of drawing a class (or a distractor).

    Attributes:
        name: ``"<class>/<style>"``, or ``"distractor/<kind>"``.
        cls: the class it is an instance of; ``None`` for a distractor.
        layers: ``rng -> Layers`` in the unit frame.
        max_rotation: degrees; the rotation is drawn uniformly in ``[-max, max]``.
        soft_edge: the fill fades into the background towards the outline (mask unchanged).
    """

    name: str
    cls: Optional[str]
    layers: Callable[[np.random.Generator], Layers]
    max_rotation: float
    soft_edge: bool = False


# --------------------------------------------------------------------------------------------
# unit-frame geometry


def _circle(n: int = 72, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    t = np.deg2rad(-90.0 + 180.0 / points * np.arange(2 * points))
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _square(half: float = 1.0) -> np.ndarray:
    return np.array([[-half, -half], [half, -half], [half, half], [-half, half]], np.float64)


def _four_turns(quarter: np.ndarray) -> np.ndarray:
    """A shape with 4-fold symmetry from one quarter of its outline, turned (x, y) -> (-y, x)."""
    turns = [quarter]
    for _ in range(3):
        turns.append(turns[-1] @ np.array([[0.0, 1.0], [-1.0, 0.0]]))
    return np.concatenate(turns)


def _plus(a: float) -> np.ndarray:
    """Plus sign with arms of half-width ``a`` reaching the unit frame's edge."""
    return _four_turns(np.array([[a, -1], [a, -a], [1, -a]], np.float64))


def _rot(pts: np.ndarray, degrees: float) -> np.ndarray:
    r = np.deg2rad(degrees)
    return pts @ np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]])


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# circle
def _disc(rng):
    return [(_circle(), FILL)]


def _dotted_disc(rng):
    return [(_circle(), FILL), (_circle(36, _u(rng, 0.25, 0.4)), DETAIL)]


def _ellipse(rng):
    return [(_circle() * [1.0, _u(rng, 0.6, 0.8)], FILL)]


# square
def _plain_square(rng):
    return [(_square(), FILL)]


def _framed_square(rng):
    outer = _u(rng, 0.55, 0.75)
    band = _u(rng, 0.1, 0.18)
    return [(_square(), FILL), (_square(outer), DETAIL), (_square(outer - band), FILL)]


def _rounded_square(rng):
    r, n = _u(rng, 0.25, 0.4), 8
    pts = []
    for k, (cx, cy) in enumerate([(1, 1), (-1, 1), (-1, -1), (1, -1)]):
        t = np.deg2rad(90.0 * k + np.linspace(0.0, 90.0, n))
        pts.append(np.stack([cx * (1 - r) + r * np.cos(t), cy * (1 - r) + r * np.sin(t)], 1))
    return [(np.concatenate(pts), FILL)]


def _sheared_square(rng):
    s = _u(rng, 0.25, 0.4)
    pts = _square() @ np.array([[1.0, 0.0], [s, 1.0]])  # x' = x + s * y
    return [(pts / [1 + s, 1.0], FILL)]


# triangle
def _equilateral(rng):
    t = np.deg2rad(-90.0 + np.array([0.0, 120.0, 240.0]))
    return [(np.stack([np.cos(t), np.sin(t)], axis=1), FILL)]


def _right_triangle(rng):
    return [(np.array([[-1, 1], [1, 1], [-1, -1]], np.float64), FILL)]


def _tall_isosceles(rng):
    b = _u(rng, 0.45, 0.6)
    return [(np.array([[0, -1], [b, 1], [-b, 1]], np.float64), FILL)]


def _notched_triangle(rng):
    w, d = _u(rng, 0.2, 0.3), _u(rng, 0.3, 0.45)
    pts = [[0, -1], [0.866, 0.5], [w, 0.5], [0, 0.5 - d], [-w, 0.5], [-0.866, 0.5]]
    return [(np.array(pts, np.float64), FILL)]


# star
def _star_style(points: int, inner: Tuple[float, float]):
    def layers(rng):
        return [(_star(points, _u(rng, *inner)), FILL)]

    return layers


# cross
def _plus_cross(rng):
    return [(_plus(_u(rng, 0.28, 0.42)), FILL)]


def _x_cross(rng):
    return [(_rot(_plus(_u(rng, 0.25, 0.38)), 45.0) * 1.3, FILL)]


def _thin_cross(rng):
    return [(_plus(_u(rng, 0.12, 0.2)), FILL)]


def _round_cross(rng):
    a = _u(rng, 0.22, 0.34)
    t = np.deg2rad(np.linspace(-90.0, 90.0, 12))  # semicircular end of the right arm
    end = np.stack([1 - a + a * np.cos(t), a * np.sin(t)], axis=1)
    return [(_four_turns(np.concatenate([[[a, -a], [1 - a, -a]], end])), FILL)]


# ring
def _ring_style(inner: Tuple[float, float]):
    def layers(rng):
        return [(_circle(), FILL), (_circle(r=_u(rng, *inner)), HOLE)]

    return layers


def _double_ring(rng):
    r1, r2, r3 = _u(rng, 0.74, 0.82), _u(rng, 0.55, 0.62), _u(rng, 0.3, 0.42)
    return [(_circle(), FILL), (_circle(r=r1), HOLE), (_circle(r=r2), FILL), (_circle(r=r3), HOLE)]


def _broken_ring(rng):
    inner, gap = _u(rng, 0.5, 0.65), np.deg2rad(_u(rng, 45.0, 80.0))
    t = np.linspace(gap / 2, 2 * np.pi - gap / 2, 64)
    outer_arc = np.stack([np.cos(t), np.sin(t)], axis=1)
    return [(np.concatenate([outer_arc, inner * outer_arc[::-1]]), FILL)]


# distractors: no class
def _heart(rng):
    t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    return [((pts - pts.mean(0)) / np.abs(pts - pts.mean(0)).max(), FILL)]


def _crescent(rng):
    return [(_circle(), FILL), (_circle(r=_u(rng, 0.8, 0.95), cx=_u(rng, 0.35, 0.55)), HOLE)]


def _arrow(rng):
    s, h0, hw = _u(rng, 0.15, 0.25), _u(rng, 0.1, 0.35), _u(rng, 0.5, 0.7)
    pts = [[-1, -s], [h0, -s], [h0, -hw], [1, 0], [h0, hw], [h0, s], [-1, s]]
    return [(np.array(pts, np.float64), FILL)]


def _hexagon(rng):
    t = np.deg2rad(60.0 * np.arange(6))
    return [(np.stack([np.cos(t), np.sin(t)], axis=1), FILL)]


def _blob(rng):
    t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4):  # a few random harmonics: smooth, irregular, no straight edges
        r += rng.uniform(0.06, 0.16) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    return [(pts / np.abs(pts).max(), FILL)]


def _styles(cls: Optional[str], rotation: float, table) -> Tuple[ShapeStyle, ...]:
    prefix = cls if cls is not None else "distractor"
    return tuple(
        ShapeStyle(f"{prefix}/{name}", cls, fn, rotation, soft) for name, fn, soft in table
    )


# Per class: (train styles, test styles). Rotation limits as in the plain set (a square turned by
# 45 degrees reads as a diamond). The table is fixed, not drawn: the same styles are held out
# for every seed, so results on different seeds are comparable.
CLASS_STYLES: Dict[str, Tuple[Tuple[ShapeStyle, ...], Tuple[ShapeStyle, ...]]] = {
    "circle": (
        _styles("circle", 90.0, [("disc", _disc, False), ("dotted_disc", _dotted_disc, False)]),
        _styles("circle", 90.0, [("ellipse", _ellipse, False), ("soft_disc", _disc, True)]),
    ),
    "square": (
        _styles(
            "square", 15.0, [("plain", _plain_square, False), ("framed", _framed_square, False)]
        ),
        _styles(
            "square",
            15.0,
            [("rounded", _rounded_square, False), ("sheared", _sheared_square, False)],
        ),
    ),
    "triangle": (
        _styles(
            "triangle",
            180.0,
            [("equilateral", _equilateral, False), ("right", _right_triangle, False)],
        ),
        _styles(
            "triangle",
            180.0,
            [("tall_isosceles", _tall_isosceles, False), ("notched", _notched_triangle, False)],
        ),
    ),
    "star": (
        _styles(
            "star",
            180.0,
            [
                ("5_point", _star_style(5, (0.38, 0.5)), False),
                ("6_point", _star_style(6, (0.42, 0.52)), False),
            ],
        ),
        _styles(
            "star",
            180.0,
            [
                ("7_point", _star_style(7, (0.5, 0.6)), False),
                ("8_point", _star_style(8, (0.55, 0.65)), False),
            ],
        ),
    ),
    "cross": (
        _styles("cross", 20.0, [("plus", _plus_cross, False), ("x_shaped", _x_cross, False)]),
        _styles("cross", 20.0, [("thin", _thin_cross, False), ("rounded", _round_cross, False)]),
    ),
    "ring": (
        _styles(
            "ring",
            90.0,
            [
                ("thin", _ring_style((0.72, 0.82)), False),
                ("thick", _ring_style((0.3, 0.45)), False),
            ],
        ),
        _styles("ring", 90.0, [("double", _double_ring, False), ("broken", _broken_ring, False)]),
    ),
}

DISTRACTOR_STYLES: Tuple[ShapeStyle, ...] = _styles(
    None,
    180.0,
    [
        ("heart", _heart, False),
        ("crescent", _crescent, False),
        ("arrow", _arrow, False),
        ("hexagon", _hexagon, False),
        ("blob", _blob, False),
    ],
)
