"""Scenes: 1-4 non-overlapping coloured shapes on a plain background, in normalised coordinates.

A ``Scene`` is the single source of truth of an image: the renderer draws it, the question generators read
their answers off it, and ``scenes.json`` stores it, so every answer can be checked against the picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .randomness import pick
from .vocabulary import BACKGROUNDS, COLORS, Combo, all_combinations

MIN_SIZE, MAX_SIZE = 0.20, 0.30  # shape bounding-box side, fraction of the image side
MAX_OBJECTS = 4
EDGE_MARGIN = 0.03  # keeps corners free of shapes (and the background visible there)
GAP = 0.04  # minimum empty space between two shapes' bounding boxes


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``x``/``y`` are the centre as fractions of the image side (y grows downwards);
    ``size`` is the side of its square bounding box, also a fraction of the image side."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def combo(self) -> Combo:
        return (self.color, self.shape)

    @property
    def name(self) -> str:
        """Referring phrase without article, e.g. ``"red circle"`` (colours are unique per scene)."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A plain background with 1-4 non-overlapping objects of pairwise distinct colours."""

    objects: tuple[SceneObject, ...]
    background: str = "white"

    def signature(self) -> tuple:
        """Coarse layout key: scenes with equal signatures look alike (same objects, positions
        within 1/10 of the image side, same background). Used to keep eval scenes out of training."""
        return (self.background,
                tuple(sorted((o.color, o.shape, int(o.x * 10), int(o.y * 10)) for o in self.objects)))

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [dict(vars(o)) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(tuple(SceneObject(**o) for o in d["objects"]), d["background"])


def separated(a: SceneObject, b: SceneObject, axis: str) -> bool:
    """True when the bounding boxes do not overlap along ``axis`` ("x" or "y"): then "left of" /
    "above" between the two is unambiguous to the eye."""
    da = abs(a.x - b.x) if axis == "x" else abs(a.y - b.y)
    return da >= (a.size + b.size) / 2


def sample_scene(rng: np.random.Generator, n_objects: int | None = None,
                 allowed_combos: Iterable[Combo] | None = None,
                 required_combos: Sequence[Combo] = (), max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw a random scene.

    Args:
        rng: the generator that all randomness comes from.
        n_objects: number of objects (default: uniform in 1..max_objects).
        allowed_combos: (colour, shape) pairs that may be drawn (default: all). Training passes
            every pair except the held-out ones.
        required_combos: pairs that must be in the scene (distinct colours), e.g. a held-out pair
            for an evaluation scene; they need not be in ``allowed_combos``.
        max_objects: upper bound of the default object count.

    Raises:
        ValueError: more than ``MAX_OBJECTS`` objects (more do not fit at these sizes reliably).
    """
    allowed = list(allowed_combos) if allowed_combos is not None else all_combinations()
    n = int(n_objects) if n_objects is not None else int(rng.integers(1, max_objects + 1))
    n = max(n, len(required_combos))
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {n}")
    if len({c for c, _ in required_combos}) != len(required_combos):
        raise ValueError(f"required combinations must have distinct colours: {required_combos}")
    while True:  # whole-scene retries: a bad early placement can leave no room for later objects
        combos = list(required_combos)
        used = {c for c, _ in combos}
        while len(combos) < n:
            options = [cs for cs in allowed if cs[0] not in used]
            if not options:
                raise ValueError("not enough allowed colours for the requested number of objects")
            color = pick(rng, sorted({c for c, _ in options}, key=list(COLORS).index))
            shape = pick(rng, [s for c, s in options if c == color])
            combos.append((color, shape))
            used.add(color)
        order = rng.permutation(len(combos))  # required objects need not come first
        objects: list[SceneObject] = []
        for i in order:
            color, shape = combos[int(i)]
            for _ in range(200):
                size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
                lo, hi = EDGE_MARGIN + size / 2, 1 - EDGE_MARGIN - size / 2
                x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
                cand = SceneObject(shape, color, round(x, 4), round(y, 4), round(size, 4))
                if all(abs(cand.x - o.x) >= (cand.size + o.size) / 2 + GAP
                       or abs(cand.y - o.y) >= (cand.size + o.size) / 2 + GAP for o in objects):
                    objects.append(cand)
                    break
            else:
                break
        if len(objects) == n:
            background = pick(rng, list(BACKGROUNDS))
            return Scene(tuple(objects), background)
