"""Drawing scenes: ``render_scene`` (one PIL image) and ``draw_all`` (every image of a run as PNG files).

Images are drawn from the stored scene dicts only, never from a random stream, so the number of worker
processes changes the speed of ``draw_all``, not its output.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .scenes import Scene, SceneObject
from .vocabulary import BACKGROUNDS, COLORS

def _shape_polygon(obj: SceneObject, side: float) -> list[tuple[float, float]] | None:
    """Vertices (pixels) of the polygonal shapes; None for the circle."""
    cx, cy, s = obj.x * side, obj.y * side, obj.size * side
    r = s / 2
    if obj.shape == "square":
        h = 0.43 * s  # slightly smaller than the box so its area matches the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        h = 0.45 * s
        return [(cx, cy - h), (cx + r, cy + h), (cx - r, cy + h)]
    if obj.shape == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
        return pts
    if obj.shape == "cross":
        t = 0.18 * s  # half arm thickness
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    if obj.shape == "circle":
        return None
    raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels.

    Shapes are drawn at 2-4x resolution and box-filtered down, so edges are anti-aliased while the
    interior of every shape keeps its exact palette colour.
    """
    factor = 4 if image_size <= 128 else 2
    side = image_size * factor
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        poly = _shape_polygon(obj, side)
        if poly is None:
            r = obj.size * side / 2
            cx, cy = obj.x * side, obj.y * side
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.reduce(factor)


def _render_and_save(task: tuple[dict, str, int]) -> None:
    scene, path, image_size = task
    render_scene(Scene.from_dict(scene), image_size).save(path, format="PNG")


def draw_all(jobs: list[tuple[dict, Path]], image_size: int, workers: int, progress: bool) -> None:
    """Render and save every (scene dict, path) job; scenes travel as dicts to worker processes."""
    for folder in {path.parent for _, path in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    tasks = [(scene, str(path), image_size) for scene, path in jobs]
    bar = tqdm(total=len(tasks), desc="drawing images", unit="img", disable=not progress)
    if workers <= 1:
        for t in tasks:
            _render_and_save(t)
            bar.update()
    else:
        with multiprocessing.Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_and_save, tasks, chunksize=64):
                bar.update()
    bar.close()
