"""One generation run's shared state: its seed streams, the held-out rule and every image it will draw.

Training and evaluation scenes are both drawn here because the rules between them are one invariant:
training scenes never contain a held-out (colour, shape) pair, and an evaluation scene is rejected when its
coarse layout signature matches a training scene (so training must be drawn first). Half the evaluation
scenes contain a held-out pair, which measures compositional generalisation. Images are only recorded
here (``scenes`` for scenes.json, ``jobs`` for ``render.draw_all``); drawing comes after all records.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .randomness import pick, stream
from .scenes import Scene, sample_scene
from .vocabulary import Combo, all_combinations

IMAGE_FOLDER = "images"  # under the output folder; every record's image path is relative to it


class GenerationRun:
    """Collects scenes and images for one generation run under ``out``."""

    def __init__(self, out: Path, seed: int, held_out: Sequence[Combo]):
        self.out, self.seed = out, seed
        self.held_out = set(held_out)
        self.allowed = [cs for cs in all_combinations() if cs not in self.held_out]
        self.jobs: list[tuple[dict, Path]] = []
        self.scenes: dict[str, dict] = {}
        self.train_signatures: set = set()
        self.train_combo_counts: Counter = Counter()

    def rng(self, purpose: str) -> np.random.Generator:
        return stream(self.seed, purpose)

    def add_image(self, scene: Scene, rel: str) -> str:
        """Record ``scene`` as the image ``rel`` (relative to the image folder) and return ``rel``."""
        self.scenes[rel] = scene.to_dict()
        self.jobs.append((self.scenes[rel], self.out / IMAGE_FOLDER / rel))
        return rel

    def train_scene(self, rng) -> Scene:
        """A scene without held-out pairs, remembered so evaluation scenes differ from it."""
        scene = sample_scene(rng, allowed_combos=self.allowed)
        self.train_signatures.add(scene.signature())
        self.train_combo_counts.update(o.combo for o in scene.objects)
        return scene

    def eval_scene(self, rng, n_objects: int | None = None,
                   accept: Callable[[Scene], bool] | None = None) -> Scene:
        """A scene unseen in training; half of them contain a held-out combination."""
        while True:
            required: list[Combo] = []
            if self.held_out and rng.random() < 0.5:
                required = [pick(rng, sorted(self.held_out))]
            scene = sample_scene(rng, n_objects=n_objects, required_combos=required)
            if scene.signature() in self.train_signatures:
                continue
            if accept is None or accept(scene):
                return scene
