"""Procedural visual-QA data: simple shape scenes, LLaVA training files and small benchmark look-alikes.

Everything the demo pipeline needs is generated here, deterministically from one seed:

```
sample_scene(rng) ──► Scene (1-4 non-overlapping coloured shapes, normalised coordinates)
        │                     │
        │ render_scene         └─► question generators (ask_*) ──► QA (question, answer, type, ...)
        ▼                                                   │
 images/train/*.png, images/eval/**.png            pretrain.json, finetune.json (LLaVA format)
                                                   eval/<bench>/ (LLaVA question files + official GT)
```

Vocabulary is small and regular on purpose (a tiny tokenizer is trained on it): 6 colours, 5 shapes,
digits, yes/no and a handful of fixed templates. Held-out (colour, shape) combinations never appear
in a training/pretraining image nor in any training text; evaluation scenes include them and every
evaluation record says so in ``metadata["held_out"]``, which measures compositional generalisation.
Evaluation scenes come from their own random streams and are rejected when their coarse layout
signature matches a training scene.

Randomness: only ``numpy.random.default_rng([seed, stream])`` generators, one stream per purpose, so
the same arguments always give byte-identical files (images are drawn from the sampled scenes, so
``workers`` changes speed, not output).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

FORMAT_VERSION = 1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 20),
    "purple": (140, 60, 190),
    "orange": (250, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "grey": (215, 215, 215)}
HELD_OUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("yellow", "circle"),
    ("green", "star"),
)
# Subtractive (paint) mixing of primaries: the facts of the text-only colour questions.
COLOR_MIXING: dict[frozenset[str], str] = {
    frozenset({"red", "blue"}): "purple",
    frozenset({"red", "yellow"}): "orange",
    frozenset({"blue", "yellow"}): "green",
}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# LLaVA-1.5's answer-format prompts, appended to questions in training and evaluation alike.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
YES_NO_PROMPT = " Please answer yes or no."  # MME's own question ending
IMAGE_TOKEN = "<image>"
OPTION_LETTERS = "ABCD"

MIN_SIZE, MAX_SIZE = 0.20, 0.30  # shape bounding-box side, fraction of the image side
MAX_OBJECTS = 4
EDGE_MARGIN = 0.03  # keeps corners free of shapes (and the background visible there)
GAP = 0.04  # minimum empty space between two shapes' bounding boxes
MME_SUBTASKS = ("existence", "count", "position", "color")
POPE_SPLITS = ("random", "popular", "adversarial")
IMAGE_FOLDER = "images"

# One random stream per purpose: changing one part's size never changes another part's content.
_STREAMS = {"pretrain": 1, "finetune": 2, "vqav2": 11, "pope": 12, "scienceqa": 13, "mme": 14,
            "gqa": 15}

Combo = tuple[str, str]  # (colour, shape)


# --------------------------------------------------------------------------------------------
# Scenes


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


def all_combinations() -> list[Combo]:
    """Every (colour, shape) pair of the vocabulary, in a fixed order."""
    return [(c, s) for c in COLORS for s in SHAPES]


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def article(word: str) -> str:
    """ "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def _sample(rng: np.random.Generator, items: Sequence, k: int) -> list:
    return [items[i] for i in rng.permutation(len(items))[:k]]


def _separated(a: SceneObject, b: SceneObject, axis: str) -> bool:
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
            color = _pick(rng, sorted({c for c, _ in options}, key=list(COLORS).index))
            shape = _pick(rng, [s for c, s in options if c == color])
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
            background = _pick(rng, list(BACKGROUNDS))
            return Scene(tuple(objects), background)


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


def caption(scene: Scene) -> str:
    """Pretraining caption naming every object, e.g. ``"a red circle left of a blue square"``.

    Two objects are related by the axis along which they are clearly apart; three or more are
    listed from left to right (by centre) after their count.
    """
    objs = sorted(scene.objects, key=lambda o: o.x)
    if len(objs) == 1:
        return f"{article(objs[0].color)} {objs[0].name}"
    if len(objs) == 2:
        a, b = objs
        if _separated(a, b, "x"):
            return f"{article(a.color)} {a.name} left of {article(b.color)} {b.name}"
        top, bottom = sorted(objs, key=lambda o: o.y)
        return f"{article(top.color)} {top.name} above {article(bottom.color)} {bottom.name}"
    names = [f"{article(o.color)} {o.name}" for o in objs]
    return f"{COUNT_WORDS[len(objs)]} objects: {', '.join(names[:-1])} and {names[-1]}"


# --------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class QA:
    """One question with a single checkable answer.

    ``question`` has no answer-format suffix and no options; ``choices`` holds the options of a
    multiple-choice question (then ``answer`` is a letter). ``qtype`` is the question type used as
    evaluation category; ``answer_type`` follows VQAv2 ("yes/no", "number", "other"); the GQA
    fields follow its ``types`` annotation; ``combos`` are the (colour, shape) pairs the question
    mentions or whose attributes decide the answer (for the held-out flag).
    """

    question: str
    answer: str
    qtype: str
    answer_type: str
    full_answer: str
    structural: str = "query"
    semantic: str = "attr"
    detailed: str = ""
    combos: tuple[Combo, ...] = ()
    choices: tuple[str, ...] = ()
    hint: str = ""
    subject: str = "natural science"


def _unique_shape_objects(scene: Scene) -> list[int]:
    counts = Counter(o.shape for o in scene.objects)
    return [i for i, o in enumerate(scene.objects) if counts[o.shape] == 1]


def _focus_or_pick(rng, candidates: list[int], focus: int | None) -> int:
    return focus if focus in candidates else _pick(rng, candidates)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _want(rng, want: bool | None) -> bool:
    return bool(rng.random() < 0.5) if want is None else want


def ask_color(scene: Scene, rng, focus: int | None = None) -> QA | None:
    """"What color is the <shape>?" for a shape that occurs once; None if every shape repeats."""
    cands = _unique_shape_objects(scene)
    if not cands:
        return None
    o = scene.objects[_focus_or_pick(rng, cands, focus)]
    return QA(f"What color is the {o.shape}?", o.color, "color", "other",
              f"The {o.shape} is {o.color}.", "query", "attr", "queryColor", (o.combo,))


def ask_color_verify(scene: Scene, rng, focus: int | None = None, want: bool | None = None,
                     allowed_combos: Sequence[Combo] | None = None) -> QA | None:
    """"Is the <shape> <colour>?" (yes/no); ``want`` fixes the answer. A "no" names another
    colour whose pair with the shape is in ``allowed_combos`` (training never names held-out pairs)."""
    cands = _unique_shape_objects(scene)
    if not cands:
        return None
    o = scene.objects[_focus_or_pick(rng, cands, focus)]
    yes = _want(rng, want)
    if yes:
        color = o.color
    else:
        allowed = set(allowed_combos) if allowed_combos is not None else None
        others = [c for c in COLORS if c != o.color and (allowed is None or (c, o.shape) in allowed)]
        if not others:
            return None
        color = _pick(rng, others)
    return QA(f"Is the {o.shape} {color}?", _yes_no(yes), "color", "yes/no",
              f"{'Yes' if yes else 'No'}, the {o.shape} is {o.color}.", "verify", "attr",
              "verifyAttr", tuple(dict.fromkeys([o.combo, (color, o.shape)])))


def ask_shape(scene: Scene, rng, focus: int | None = None) -> QA:
    """"What shape is the <colour> object?" (colours are unique in a scene)."""
    o = scene.objects[_focus_or_pick(rng, list(range(len(scene.objects))), focus)]
    return QA(f"What shape is the {o.color} object?", o.shape, "shape", "other",
              f"The {o.color} object is a {o.shape}.", "query", "attr", "queryShape", (o.combo,))


def ask_count(scene: Scene, rng, focus: int | None = None) -> QA:
    """"How many objects are there?" or "How many <shape>s are there?" (answer a digit, may be 0)."""
    if focus is None and rng.random() < 0.35:
        n = len(scene.objects)
        return QA("How many objects are there?", str(n), "count", "number",
                  f"There are {n} objects.", "query", "obj", "countObj",
                  tuple(o.combo for o in scene.objects))
    if focus is not None:
        shape = scene.objects[focus].shape
    elif rng.random() < 0.75:
        shape = _pick(rng, scene.objects).shape
    else:
        shape = _pick(rng, SHAPES)
    hits = tuple(o.combo for o in scene.objects if o.shape == shape)
    return QA(f"How many {PLURALS[shape]} are there?", str(len(hits)), "count", "number",
              f"There are {len(hits)} {PLURALS[shape]}.", "query", "obj", "countShape", hits)


def _count_phrase(n: int, shape: str | None) -> str:
    noun = shape or "object"
    if n == 1:
        return f"Is there exactly 1 {noun} in the image?"
    return f"Are there exactly {n} {PLURALS[shape] if shape else 'objects'} in the image?"


def ask_count_verify(scene: Scene, rng, focus: int | None = None, want: bool | None = None) -> QA:
    """"Are there exactly <n> <shape>s in the image?" (yes/no); a "no" asks a wrong count in 1-4."""
    if focus is None and rng.random() < 0.5:
        shape, hits = None, tuple(o.combo for o in scene.objects)
    else:
        shape = (scene.objects[focus] if focus is not None else _pick(rng, scene.objects)).shape
        hits = tuple(o.combo for o in scene.objects if o.shape == shape)
    yes = _want(rng, want)
    n = len(hits) if yes else _pick(rng, [k for k in range(1, 5) if k != len(hits)])
    return QA(_count_phrase(n, shape), _yes_no(yes), "count", "yes/no",
              f"{'Yes' if yes else 'No'}, there {'is' if len(hits) == 1 else 'are'} {len(hits)}.",
              "verify", "obj", "verifyCount", hits)


def _absent_combo(scene: Scene, rng, allowed_combos: Sequence[Combo] | None,
                  exclude: Iterable[Combo] = ()) -> Combo | None:
    present = {o.combo for o in scene.objects} | set(exclude)
    pool = [cs for cs in (allowed_combos if allowed_combos is not None else all_combinations())
            if cs not in present]
    if not pool:
        return None
    if rng.random() < 0.5:  # half the negatives are near misses: share a colour or a shape
        near = [cs for cs in pool
                if any(cs[0] == o.color or cs[1] == o.shape for o in scene.objects)]
        pool = near or pool
    return _pick(rng, pool)


def presence_question(color: str, shape: str) -> str:
    """The single presence template, shared by training, VQAv2, POPE and MME."""
    return f"Is there {article(color)} {color} {shape} in the image?"


def ask_presence(scene: Scene, rng, focus: int | None = None, want: bool | None = None,
                 allowed_combos: Sequence[Combo] | None = None) -> QA | None:
    """"Is there a <colour> <shape> in the image?"; yes/no balanced unless ``want`` is given.
    Absent pairs come from ``allowed_combos`` (half of them share a colour or shape with the scene)."""
    yes = _want(rng, want)
    if yes:
        combo = scene.objects[_focus_or_pick(rng, list(range(len(scene.objects))), focus)].combo
    else:
        combo = _absent_combo(scene, rng, allowed_combos)
        if combo is None:
            return None
    full = f"Yes, there is {article(combo[0])} {combo[0]} {combo[1]}." if yes else \
        f"No, there is no {combo[0]} {combo[1]}."
    return QA(presence_question(*combo), _yes_no(yes), "presence", "yes/no", full, "verify", "obj",
              "existAttr", (combo,))


_RELATIONS = {  # relation phrase -> (axis, the subject's coordinate is smaller)
    "left of": ("x", True), "right of": ("x", False), "above": ("y", True), "below": ("y", False)}
_WHICH = {"further left": ("x", True), "further right": ("x", False), "higher": ("y", True),
          "lower": ("y", False)}


def _separated_pairs(scene: Scene, axis: str | None = None) -> list[tuple[int, int, str]]:
    out = []
    for i in range(len(scene.objects)):
        for j in range(len(scene.objects)):
            if i != j:
                for ax in ("x", "y"):
                    if (axis is None or ax == axis) and \
                            _separated(scene.objects[i], scene.objects[j], ax):
                        out.append((i, j, ax))
    return out


def _holds(a: SceneObject, b: SceneObject, axis: str, smaller: bool) -> bool:
    va, vb = (a.x, b.x) if axis == "x" else (a.y, b.y)
    return va < vb if smaller else va > vb


def _pick_separated_pair(scene: Scene, rng, focus: int | None):
    """(A, B, axis) for two objects clearly apart along the axis, preferring pairs with object `focus`;
    None for one-object scenes."""
    pairs = _separated_pairs(scene)
    if focus is not None:
        pairs = [p for p in pairs if focus in p[:2]] or pairs
    if not pairs:
        return None
    i, j, axis = _pick(rng, pairs)
    return scene.objects[i], scene.objects[j], axis


def ask_position(scene: Scene, rng, focus: int | None = None, want: bool | None = None) -> QA | None:
    """"Is the <A> left of / right of / above / below the <B>?" for two objects clearly apart along
    that axis; None for one-object scenes."""
    picked = _pick_separated_pair(scene, rng, focus)
    if picked is None:
        return None
    a, b, axis = picked
    yes = _want(rng, want)
    rel = _pick(rng, [r for r, (ax, sm) in _RELATIONS.items()
                      if ax == axis and _holds(a, b, ax, sm) == yes])
    full = f"{'Yes' if yes else 'No'}, the {a.name} is {'' if yes else 'not '}{rel} the {b.name}."
    return QA(f"Is the {a.name} {rel} the {b.name}?", _yes_no(yes), "position", "yes/no", full,
              "verify", "rel", "relVerify", (a.combo, b.combo))


def ask_position_which(scene: Scene, rng, focus: int | None = None) -> QA | None:
    """"Which is further left, the <A> or the <B>?" (answer "<colour> <shape>")."""
    picked = _pick_separated_pair(scene, rng, focus)
    if picked is None:
        return None
    a, b, axis = picked
    word = _pick(rng, [w for w, (ax, _) in _WHICH.items() if ax == axis])
    ax, smaller = _WHICH[word]
    winner = a if _holds(a, b, ax, smaller) else b
    return QA(f"Which is {word}, the {a.name} or the {b.name}?", winner.name, "position", "other",
              f"The {winner.name} is {word}.", "compare", "rel", "relCompare",
              (a.combo, b.combo))


def ask_logical(scene: Scene, rng, focus: int | None = None, want: bool | None = None,
                allowed_combos: Sequence[Combo] | None = None) -> QA | None:
    """"Is there a <A> and/or a <B> in the image?" (yes/no)."""
    yes = _want(rng, want)
    present = [o.combo for o in scene.objects]
    op = "or" if yes and len(present) < 2 else _pick(rng, ["and", "or"])  # keeps yes/no balanced
    # number of the two named objects that are present, for the wanted truth value
    n_present = {("and", True): 2, ("and", False): int(rng.integers(0, 2)),
                 ("or", True): int(rng.integers(1, 3)), ("or", False): 0}[(op, yes)]
    n_present = min(n_present, len(present))
    named = _sample(rng, present, n_present)
    if focus is not None and n_present and scene.objects[focus].combo not in named:
        named[0] = scene.objects[focus].combo
    while len(named) < 2:
        combo = _absent_combo(scene, rng, allowed_combos, exclude=named)
        if combo is None:
            return None
        named.append(combo)
    named = _sample(rng, named, 2)
    (c1, s1), (c2, s2) = named
    question = f"Is there {article(c1)} {c1} {s1} {op} {article(c2)} {c2} {s2} in the image?"
    return QA(question, _yes_no(yes), "logical",
              "yes/no", f"{'Yes' if yes else 'No'}.", "logical", "obj",
              "existAttrAnd" if op == "and" else "existAttrOr", tuple(named))


def _with_options(qa: QA, correct: str, pool: Sequence[str], rng, n_options: int) -> QA:
    """Turn a short-answer QA into a multiple-choice one (options shuffled, answer a letter)."""
    distractors = _sample(rng, [p for p in pool if p != correct], n_options - 1)
    options = _sample(rng, [correct] + distractors, n_options)
    letter = OPTION_LETTERS[options.index(correct)]
    return QA(qa.question, letter, "multiple_choice", "other", f"The answer is {letter}. {correct}",
              qa.structural, qa.semantic, qa.detailed, qa.combos, tuple(options), qa.hint,
              qa.subject)


def ask_multiple_choice(scene: Scene, rng, focus: int | None = None,
                        n_options: int | None = None) -> QA | None:
    """A colour, shape, count or "which is further ..." question with options A-D (2 for "which").
    ``qtype`` is "multiple_choice"; ``detailed`` keeps the inner question's kind."""
    kind = _pick(rng, ["color", "shape", "count", "which"])
    n = n_options or int(rng.integers(3, 5))
    if kind == "color":
        qa = ask_color(scene, rng, focus)
        return qa and _with_options(qa, qa.answer, list(COLORS), rng, n)
    if kind == "shape":
        qa = ask_shape(scene, rng, focus)
        return _with_options(qa, qa.answer, SHAPES, rng, n)
    if kind == "count":
        qa = ask_count(scene, rng, focus)
        return _with_options(qa, qa.answer, [str(k) for k in range(5)], rng, n)
    qa = ask_position_which(scene, rng, focus)
    if qa is None:
        return None
    names = [o.name for o in scene.objects if o.combo in qa.combos]
    return _with_options(qa, qa.answer, names, rng, 2)


# Text-only questions (no image): checkable facts over the same small vocabulary.

def ask_color_mixing(rng) -> QA:
    """"What color do you get by mixing red and blue?" (paint primaries)."""
    pair, result = _pick(rng, list(COLOR_MIXING.items()))
    a, b = _sample(rng, sorted(pair), 2)
    return QA(f"What color do you get by mixing {a} and {b}?", result, "color_mixing", "other",
              f"Mixing {a} and {b} makes {result}.", hint="Mixing two paint colors makes a new color.",
              subject="natural science")


def ask_arithmetic(rng) -> QA:
    """"What is 3 plus 4?" / "What is 7 minus 2?" with single-digit operands."""
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    if rng.random() < 0.5:
        q, ans = f"What is {a} plus {b}?", a + b
    else:
        a, b = max(a, b), min(a, b)
        q, ans = f"What is {a} minus {b}?", a - b
    return QA(q, str(ans), "arithmetic", "number", f"The answer is {ans}.", subject="natural science")


def ask_word_category(rng) -> QA:
    """"Is the word circle a color or a shape?"."""
    word = _pick(rng, list(COLORS) + list(SHAPES))
    kind = "color" if word in COLORS else "shape"
    return QA(f"Is the word {word} a color or a shape?", kind, "word_category", "other",
              f"The word {word} is a {kind}.", subject="language science")


def ask_alphabetical(rng) -> QA:
    """"Which word comes first in alphabetical order, circle or blue?"."""
    a, b = _sample(rng, list(COLORS) + list(SHAPES), 2)
    first = min(a, b)
    return QA(f"Which word comes first in alphabetical order, {a} or {b}?", first, "alphabetical",
              "other", f"The word {first} comes first.", subject="language science")


def ask_text_multiple_choice(rng) -> QA:
    """ScienceQA-style text-only problem: colour mixing (natural science) or word questions
    (language science), with 2-4 options."""
    kind = _pick(rng, ["mixing", "category", "alphabetical"])
    if kind == "mixing":
        qa = ask_color_mixing(rng)
        qa = QA(qa.question.replace("What color do you get", "Which color do you get"), qa.answer,
                qa.qtype, qa.answer_type, qa.full_answer, hint=qa.hint, subject=qa.subject)
        return _with_options(qa, qa.answer, list(COLORS), rng, int(rng.integers(2, 5)))
    if kind == "category":
        want = _pick(rng, ["color", "shape"])
        correct = _pick(rng, list(COLORS) if want == "color" else list(SHAPES))
        pool = list(SHAPES) if want == "color" else list(COLORS)
        qa = QA(f"Which word is a {want}?", correct, "word_category", "other", "",
                subject="language science")
        return _with_options(qa, correct, pool, rng, int(rng.integers(2, 5)))
    words = _sample(rng, list(COLORS) + list(SHAPES), int(rng.integers(2, 4)))
    qa = QA("Which word would you find first in alphabetical order?", min(words), "alphabetical",
            "other", "", subject="language science")
    return _with_options(qa, min(words), words, rng, len(words))


def prompt_text(qa: QA, suffix: bool = True, context: str | None = None,
                yes_no_prompt: bool = False) -> str:
    """The question as the model sees it (no ``<image>``): optional ScienceQA-style
    ``Context: ...`` line, the question, options ``A. ...`` one per line, then LLaVA's
    answer-format suffix (the letter one for multiple choice)."""
    text = qa.question + (YES_NO_PROMPT if yes_no_prompt else "")
    if context is not None:
        text = f"Context: {context or 'N/A'}\n{text}"
    if qa.choices:
        text += "\n" + "\n".join(f"{OPTION_LETTERS[k]}. {c}" for k, c in enumerate(qa.choices))
        return text + (MULTIPLE_CHOICE_SUFFIX if suffix else "")
    return text + (SHORT_ANSWER_SUFFIX if suffix else "")


_TYPE_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("multiple_choice", re.compile(r"\nA\. ")),
    ("color_mixing", re.compile(r"^\w+ color do you get by mixing")),
    ("arithmetic", re.compile(r"^What is \d+ (plus|minus) \d+\?")),
    ("word_category", re.compile(r"^(Is the word \w+ a color or a shape|Which word is a)")),
    ("alphabetical", re.compile(r"alphabetical order")),
    ("color", re.compile(r"^What color is the")),
    ("color_verify", re.compile(r"^Is the \w+ (" + "|".join(COLORS) + r")\?")),
    ("shape", re.compile(r"^What shape is the")),
    ("count", re.compile(r"^How many")),
    ("count_verify", re.compile(r"^(Is there exactly|Are there exactly)")),
    ("logical", re.compile(r"^Is there an? \w+ \w+ (and|or) an? ")),
    ("presence", re.compile(r"^Is there an? ")),
    ("position", re.compile(r"^Is the .* (left of|right of|above|below) the ")),
    ("position_which", re.compile(r"^Which is ")),
]


def question_type_of(text: str) -> str:
    """Fine question kind of a prompt built from this module's templates (with or without
    ``<image>``, context line and suffixes): one of the ``TRAIN_QUESTION_MIX`` keys, a text-only
    kind ("color_mixing", "arithmetic", "word_category", "alphabetical") or "other". Yes/no
    variants are kinds of their own ("color_verify", ...), like VQA's prefix-based question types.
    Lets training samples, which carry no type field, be grouped like evaluation records."""
    text = text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
    text = re.sub(r"^Context: [^\n]*\n", "", text)
    for name, pattern in _TYPE_PATTERNS:
        if pattern.search(text):
            return name
    return "other"


# Weights of the training question mix (yes/no kinds are answer-balanced inside their generator).
TRAIN_QUESTION_MIX: dict[str, float] = {
    "color": 0.12, "color_verify": 0.05, "shape": 0.12, "count": 0.12, "count_verify": 0.05,
    "presence": 0.16, "position": 0.12, "position_which": 0.06, "logical": 0.07,
    "multiple_choice": 0.13}


def ask(kind: str, scene: Scene, rng, focus: int | None = None, want: bool | None = None,
        allowed_combos: Sequence[Combo] | None = None) -> QA | None:
    """Dispatch to the ``ask_<kind>`` generator by name (see ``TRAIN_QUESTION_MIX``)."""
    if kind == "color":
        return ask_color(scene, rng, focus)
    if kind == "color_verify":
        return ask_color_verify(scene, rng, focus, want, allowed_combos)
    if kind == "shape":
        return ask_shape(scene, rng, focus)
    if kind == "count":
        return ask_count(scene, rng, focus)
    if kind == "count_verify":
        return ask_count_verify(scene, rng, focus, want)
    if kind == "presence":
        return ask_presence(scene, rng, focus, want, allowed_combos)
    if kind == "position":
        return ask_position(scene, rng, focus, want)
    if kind == "position_which":
        return ask_position_which(scene, rng, focus)
    if kind == "logical":
        return ask_logical(scene, rng, focus, want, allowed_combos)
    if kind == "multiple_choice":
        return ask_multiple_choice(scene, rng, focus)
    raise ValueError(f"unknown question kind {kind!r}")


def ask_mixed(scene: Scene, rng, kinds: dict[str, float], allowed_combos, focus=None,
              avoid: Iterable[str] = ()) -> QA | None:
    """A question of a kind drawn with ``kinds``' weights; retries kinds that do not apply to the
    scene and questions already in ``avoid`` (earlier turns)."""
    avoid = set(avoid)
    names = list(kinds)
    p = np.array([kinds[k] for k in names])
    for _ in range(20):
        qa = ask(names[int(rng.choice(len(names), p=p / p.sum()))], scene, rng, focus,
                 allowed_combos=allowed_combos)
        if qa is not None and qa.question not in avoid:
            return qa
    return None


# --------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def _render_and_save(task: tuple[dict, str, int]) -> None:
    scene, path, image_size = task
    render_scene(Scene.from_dict(scene), image_size).save(path, format="PNG")


def _draw_all(jobs: list[tuple[dict, Path]], image_size: int, workers: int, progress: bool) -> None:
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


class _Builder:
    """Collects scenes, images and records for one generation run."""

    def __init__(self, out: Path, seed: int, held_out: Sequence[Combo]):
        self.out, self.seed = out, seed
        self.held_out = set(held_out)
        self.allowed = [cs for cs in all_combinations() if cs not in self.held_out]
        self.jobs: list[tuple[dict, Path]] = []
        self.scenes: dict[str, dict] = {}
        self.train_signatures: set = set()
        self.train_combo_counts: Counter = Counter()

    def rng(self, stream: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAMS[stream]])

    def add_image(self, scene: Scene, rel: str) -> str:
        self.scenes[rel] = scene.to_dict()
        self.jobs.append((self.scenes[rel], self.out / IMAGE_FOLDER / rel))
        return rel

    # training ---------------------------------------------------------------------------
    def train_scene(self, rng) -> Scene:
        scene = sample_scene(rng, allowed_combos=self.allowed)
        self.train_signatures.add(scene.signature())
        self.train_combo_counts.update(o.combo for o in scene.objects)
        return scene

    def pretrain(self, n: int) -> list[dict]:
        rng, rows = self.rng("pretrain"), []
        for k in range(n):
            scene = self.train_scene(rng)
            rel = self.add_image(scene, f"train/p{k:06d}.png")
            rows.append({"id": f"p{k:06d}", "image": rel, "conversations": [
                {"from": "human", "value": IMAGE_TOKEN + "\n"},
                {"from": "gpt", "value": caption(scene)}]})
        return rows

    def finetune(self, n: int) -> list[dict]:
        rng, rows = self.rng("finetune"), []
        for k in range(n):
            sid = f"f{k:06d}"
            if rng.random() < 0.05:  # text-only sample: no image key
                gen = _pick(rng, [ask_color_mixing, ask_arithmetic, ask_word_category,
                                  ask_alphabetical, ask_text_multiple_choice])
                qa = gen(rng)
                rows.append({"id": sid, "conversations": self._turns([qa], rng, image=False)})
                continue
            scene = self.train_scene(rng)
            n_turns = int(rng.choice(3, p=[0.4, 0.35, 0.25])) + 1
            qas: list[QA] = []
            for _ in range(n_turns):
                qa = ask_mixed(scene, rng, TRAIN_QUESTION_MIX, self.allowed,
                               avoid={q.question for q in qas})
                if qa is not None:
                    qas.append(qa)
            rel = self.add_image(scene, f"train/{sid}.png")
            rows.append({"id": sid, "image": rel, "conversations": self._turns(qas, rng, image=True)})
        return rows

    @staticmethod
    def _turns(qas: list[QA], rng, image: bool) -> list[dict]:
        turns = []
        for t, qa in enumerate(qas):
            # Multiple choice always carries its letter prompt; other turns mostly carry the
            # short-answer suffix, sometimes nothing (plain conversational questions).
            suffix = bool(qa.choices) or rng.random() < 0.85
            context = None
            if qa.choices and (qa.hint or rng.random() < 0.5):
                context = qa.hint
            yn = qa.answer_type == "yes/no" and rng.random() < 0.15
            text = prompt_text(qa, suffix=suffix, context=context, yes_no_prompt=yn)
            if image and t == 0:
                text = IMAGE_TOKEN + "\n" + text
            turns += [{"from": "human", "value": text}, {"from": "gpt", "value": qa.answer}]
        return turns

    # evaluation ---------------------------------------------------------------------------
    def eval_scene(self, rng, n_objects: int | None = None,
                   accept: Callable[[Scene], bool] | None = None) -> Scene:
        """A scene unseen in training; half of them contain a held-out combination."""
        while True:
            required: list[Combo] = []
            if self.held_out and rng.random() < 0.5:
                required = [_pick(rng, sorted(self.held_out))]
            scene = sample_scene(rng, n_objects=n_objects, required_combos=required)
            if scene.signature() in self.train_signatures:
                continue
            if accept is None or accept(scene):
                return scene

    def focus(self, scene: Scene, rng) -> int | None:
        """Prefer asking about the held-out object when the scene has one (60%)."""
        idx = [i for i, o in enumerate(scene.objects) if o.combo in self.held_out]
        return _pick(rng, idx) if idx and rng.random() < 0.6 else None

    def meta(self, qa: QA, scene: Scene | None, **extra) -> dict:
        return {"question_type": question_type_of(prompt_text(qa)), "answer": qa.answer,
                "held_out": any(c in self.held_out for c in qa.combos),
                "scene_held_out": bool(scene and any(o.combo in self.held_out
                                                     for o in scene.objects)), **extra}


_VQA_PREFIXES = ("what color is the", "what shape is the", "how many", "is there exactly",
                 "are there exactly", "is there a", "is the", "which is", "what is")
_NUMBER_WORDS = dict(zip(map(str, range(10)), COUNT_WORDS))


def _vqa_question_type(question: str) -> str:
    q = question.lower()
    return next((p for p in _VQA_PREFIXES if q.startswith(p)), "none of the above")


def _annotator_answers(qa: QA, rng) -> list[str]:
    """Ten simulated annotator answers: the right one, often as written and sometimes varied (case,
    trailing period, articles, number words; the official vqaEval.py reconciles only the trailing
    period, so the other variants count as different answers), plus 0-2 wrong ones (so the right
    answer keeps the >= 3 matches VQA's metric needs, as in the real data)."""
    right = qa.answer
    variants = [right, right.capitalize(), right + ".", right + " "]
    if right in _NUMBER_WORDS:
        variants += [_NUMBER_WORDS[right]]
    elif right in SHAPES:
        variants += ["a " + right]
    elif qa.answer_type == "other" and right not in COLORS:
        variants += ["the " + right]
    wrong = set(rng.permutation(10)[:int(rng.choice(3, p=[0.6, 0.3, 0.1]))].tolist())
    return [_wrong_answer(qa, rng) if k in wrong else
            right if rng.random() < 0.6 else _pick(rng, variants) for k in range(10)]


def _wrong_answer(qa: QA, rng) -> str:
    a = qa.answer
    if a in ("yes", "no"):
        return "no" if a == "yes" else "yes"
    if a.isdigit():
        return str(int(a) + 1 if a == "0" or rng.random() < 0.5 else int(a) - 1)
    if a in COLORS:
        return _pick(rng, [c for c in COLORS if c != a])
    if a in SHAPES:
        return _pick(rng, [s for s in SHAPES if s != a])
    return _pick(rng, [f"{c} {s}" for c, s in all_combinations() if f"{c} {s}" != a])


VQAV2_MIX = {"color": 0.2, "shape": 0.15, "count": 0.2, "presence": 0.2, "position": 0.15,
             "logical": 0.1}
GQA_MIX = {"color": 0.2, "shape": 0.2, "presence": 0.2, "position": 0.2, "position_which": 0.1,
           "logical": 0.1}


def _eval_questions(b: _Builder, rng, scene: Scene, mix: dict[str, float], k: int) -> list[QA]:
    qas: list[QA] = []
    for _ in range(k):
        qa = ask_mixed(scene, rng, mix, None, focus=b.focus(scene, rng),
                       avoid={q.question for q in qas})
        if qa is not None:
            qas.append(qa)
    return qas


def _make_vqav2(b: _Builder, n: int) -> dict:
    rng, d = b.rng("vqav2"), b.out / "eval" / "vqav2"
    rows, questions, annotations = [], [], []
    image_id = 0
    while len(rows) < n:
        image_id += 1
        scene = b.eval_scene(rng)
        rel = b.add_image(scene, f"eval/vqav2_{image_id:05d}.png")
        for k, qa in enumerate(_eval_questions(b, rng, scene, VQAV2_MIX, min(3, n - len(rows)))):
            qid = image_id * 10 + k
            rows.append({"question_id": qid, "image": rel, "text": prompt_text(qa),
                         "category": qa.qtype, "metadata": b.meta(qa, scene)})
            questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id,
                "question_type": _vqa_question_type(qa.question), "answer_type": qa.answer_type,
                "multiple_choice_answer": qa.answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(_annotator_answers(qa, rng))]})
    _write_jsonl(d / "llava_vqav2_val.jsonl", rows)
    _write_json(d / "v2_OpenEnded_mscoco_val_questions.json",
                {"info": {"description": "mm_moslora demo shapes"}, "task_type": "Open-Ended",
                 "data_type": "mscoco", "data_subtype": "val2014", "questions": questions})
    _write_json(d / "v2_mscoco_val_annotations.json",
                {"info": {"description": "mm_moslora demo shapes"}, "data_type": "mscoco",
                 "data_subtype": "val2014", "annotations": annotations})
    return {"question_file": "eval/vqav2/llava_vqav2_val.jsonl",
            "annotation_files": ["eval/vqav2/v2_mscoco_val_annotations.json"],
            "annotations": {"questions": "eval/vqav2/v2_OpenEnded_mscoco_val_questions.json",
                            "annotations": "eval/vqav2/v2_mscoco_val_annotations.json"},
            "rows": rows}


def _pope_negatives(b: _Builder, scene: Scene, rng, split: str, k: int) -> list[Combo]:
    present = {o.combo for o in scene.objects}
    absent = [cs for cs in all_combinations() if cs not in present]
    if split == "popular":  # the most frequent objects of the training images
        ranked = sorted(absent, key=lambda cs: (-b.train_combo_counts[cs], all_combinations().index(cs)))
        return ranked[:k]
    if split == "adversarial":  # absent objects that look like present ones
        near = [cs for cs in absent if any(cs[0] == o.color or cs[1] == o.shape
                                           for o in scene.objects)]
        return _sample(rng, near, k)
    return _sample(rng, absent, k)


def _make_pope(b: _Builder, n: int) -> dict:
    """POPE: the same images in the three splits, k present + k absent objects per image."""
    rng, d = b.rng("pope"), b.out / "eval" / "pope"
    per_split = {s: [] for s in POPE_SPLITS}
    img = 0
    while n - len(per_split["random"]) >= 2:
        img += 1
        scene = b.eval_scene(rng)
        rel = b.add_image(scene, f"eval/pope_{img:05d}.png")
        k = min(3, len(scene.objects), (n - len(per_split["random"])) // 2)
        positives = _sample(rng, [o.combo for o in scene.objects], k)
        for split in POPE_SPLITS:
            negatives = _pope_negatives(b, scene, rng, split, k)
            for pos, neg in zip(positives, negatives):  # alternate yes/no like POPE's files
                for combo, label in ((pos, "yes"), (neg, "no")):
                    per_split[split].append((rel, combo, label, scene))
    rows, qid = [], 0
    for split in POPE_SPLITS:
        lines = []
        for rel, combo, label, scene in per_split[split]:
            qid += 1
            qa = QA(presence_question(*combo), label, "presence", "yes/no", "", combos=(combo,))
            lines.append({"question_id": qid, "image": rel, "text": qa.question, "label": label})
            rows.append({"question_id": qid, "image": rel, "text": prompt_text(qa),
                         "category": split, "metadata": b.meta(qa, scene, split=split)})
        _write_jsonl(d / f"coco_pope_{split}.json", lines)
    _write_jsonl(d / "llava_pope_test.jsonl", rows)
    return {"question_file": "eval/pope/llava_pope_test.jsonl",
            "annotation_files": [f"eval/pope/coco_pope_{s}.json" for s in POPE_SPLITS],
            "annotations": {s: f"eval/pope/coco_pope_{s}.json" for s in POPE_SPLITS}, "rows": rows}


def _make_scienceqa(b: _Builder, n: int) -> dict:
    rng, d = b.rng("scienceqa"), b.out / "eval" / "scienceqa"
    rows, problems = [], {}
    for k in range(n):
        pid = str(k + 1)
        scene = None
        if rng.random() < 0.25:
            qa = ask_text_multiple_choice(rng)
        else:
            qa = None
            while qa is None:
                scene = b.eval_scene(rng)
                qa = ask_multiple_choice(scene, rng, b.focus(scene, rng))
        row: dict[str, Any] = {"question_id": pid}
        image_name = None
        if scene is not None:  # text-only problems have no image key, as in LLaVA's file
            row["image"] = b.add_image(scene, f"eval/sqa_{k + 1:05d}.png")
            image_name = Path(row["image"]).name
        row.update(text=prompt_text(qa, context=qa.hint), category=qa.subject,
                   metadata=b.meta(qa, scene))
        rows.append(row)
        problems[pid] = {"question": qa.question, "choices": list(qa.choices),
                         "answer": OPTION_LETTERS.index(qa.answer), "hint": qa.hint,
                         "image": image_name, "task": "closed choice", "split": "test",
                         "subject": qa.subject, "grade": "grade1" if scene else "grade2"}
    _write_jsonl(d / "llava_test_CQM-A.jsonl", rows)
    _write_json(d / "problems.json", problems)
    _write_json(d / "pid_splits.json", {"test": list(problems)})
    return {"question_file": "eval/scienceqa/llava_test_CQM-A.jsonl",
            "annotation_files": ["eval/scienceqa/problems.json"],
            "split_file": "eval/scienceqa/pid_splits.json",
            "annotations": {"problems": "eval/scienceqa/problems.json",
                            "pid_splits": "eval/scienceqa/pid_splits.json"},
            "rows": rows}


def _mme_pair(subtask: str, scene: Scene, rng, focus) -> tuple[QA, QA] | None:
    """MME asks one question answered Yes and one answered No about the same image."""
    make = {"existence": lambda w: ask_presence(scene, rng, focus, w),
            "count": lambda w: ask_count_verify(scene, rng, focus, w),
            "position": lambda w: ask_position(scene, rng, focus, w),
            "color": lambda w: ask_color_verify(scene, rng, focus, w)}[subtask]
    yes, no = make(True), make(False)
    return (yes, no) if yes is not None and no is not None else None


def _make_mme(b: _Builder, n: int) -> dict:
    rng, d = b.rng("mme"), b.out / "eval" / "mme"
    n_img = max(1, round(n / (2 * len(MME_SUBTASKS))))
    rows, links = [], []
    for subtask in MME_SUBTASKS:
        for k in range(n_img):
            pair = None
            while pair is None:
                scene = b.eval_scene(rng, accept=lambda s: len(s.objects) >= (2 if subtask == "position" else 1))
                pair = _mme_pair(subtask, scene, rng, b.focus(scene, rng))
            stem = f"{k:04d}"
            rel = b.add_image(scene, f"eval/mme/{subtask}/{stem}.png")
            links.append((rel, d / "MME_Benchmark" / subtask / "images" / f"{stem}.png"))
            lines = []
            for qa, gt in zip(pair, ("Yes", "No")):
                question = qa.question + YES_NO_PROMPT
                lines.append(f"{question}\t{gt}\n")
                rows.append({
                    "question_id": f"{subtask}/{stem}.png#{gt.lower()}", "image": rel,
                    "text": question + SHORT_ANSWER_SUFFIX, "category": subtask,
                    "metadata": {"category": subtask, "image": f"{stem}.png", "question": question,
                                 **b.meta(qa, scene)}})
            txt = d / "MME_Benchmark" / subtask / "questions_answers_YN" / f"{stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("".join(lines))
    _write_jsonl(d / "llava_mme.jsonl", rows)
    return {"question_file": "eval/mme/llava_mme.jsonl",
            "annotation_files": ["eval/mme/MME_Benchmark"],
            "annotations": {"mme_root": "eval/mme/MME_Benchmark"}, "rows": rows, "links": links}


def _make_gqa(b: _Builder, n: int) -> dict:
    rng, d = b.rng("gqa"), b.out / "eval" / "gqa"
    rows, gt = [], {}
    img = 0
    while len(rows) < n:
        img += 1
        scene = b.eval_scene(rng)
        stem = f"gqa_{img:05d}"
        rel = b.add_image(scene, f"eval/{stem}.png")
        for k, qa in enumerate(_eval_questions(b, rng, scene, GQA_MIX, min(3, n - len(rows)))):
            qid = str(img * 10 + k)
            rows.append({"question_id": qid, "image": rel, "text": prompt_text(qa),
                         "category": qa.qtype, "metadata": b.meta(qa, scene)})
            gt[qid] = {"imageId": stem, "question": qa.question, "answer": qa.answer,
                       "fullAnswer": qa.full_answer, "isBalanced": True,
                       "types": {"structural": qa.structural, "semantic": qa.semantic,
                                 "detailed": qa.detailed}}
    _write_jsonl(d / "llava_gqa_testdev_balanced.jsonl", rows)
    _write_json(d / "testdev_balanced_questions.json", gt)
    return {"question_file": "eval/gqa/llava_gqa_testdev_balanced.jsonl",
            "annotation_files": ["eval/gqa/testdev_balanced_questions.json"],
            "annotations": {"questions": "eval/gqa/testdev_balanced_questions.json"}, "rows": rows}


EVAL_BENCHMARKS: dict[str, Callable[[_Builder, int], dict]] = {
    "vqav2": _make_vqav2, "pope": _make_pope, "scienceqa": _make_scienceqa, "mme": _make_mme,
    "gqa": _make_gqa}


# --------------------------------------------------------------------------------------------
# Run management


class DemoDataExistsError(RuntimeError):
    """The output folder holds data generated with other arguments (or foreign files)."""


_OUTPUTS = ("images/train", "images/eval", "eval", "pretrain.json", "finetune.json",
            "scenes.json", "manifest.json")
_IN_PROGRESS = ".demo_data_incomplete"


def _clear_outputs(out: Path) -> None:
    """Remove only what a previous run of this generator wrote."""
    (out / "manifest.json").unlink(missing_ok=True)  # first: a crash below must not look complete
    for rel in _OUTPUTS:
        p = out / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete run in ``out_dir``, or None."""
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def generate(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 4000,
             n_pretrain: int = 4000, n_eval: int = 300, image_size: int = 64, workers: int = 1,
             overwrite: bool = False, held_out: Sequence[Combo] = HELD_OUT_COMBINATIONS,
             progress: bool = True) -> dict:
    """Generate the whole demo data set under ``out_dir`` and return its manifest.

    Args:
        out_dir: output folder (created). Image paths in every record are relative to
            ``out_dir/images`` (the ``--image-folder`` to pass to training and evaluation).
        seed: base seed; the same arguments give identical files.
        n_train: finetune samples (about 5% text-only, the rest 1-3 QA turns on an image).
        n_pretrain: caption samples (one image each).
        n_eval: questions per benchmark (per split for POPE; MME gets ``n_eval/8`` images per
            subtask, two questions each).
        image_size: image side in pixels (64 default; 64-224 intended).
        workers: processes that draw images (output does not depend on it).
        overwrite: replace a previous run made with other arguments.
        held_out: (colour, shape) pairs kept out of all training images and texts.
        progress: show a tqdm bar while drawing.

    Returns:
        The manifest (also written last to ``out_dir/manifest.json``), plus ``"status"``:
        ``"generated"``, or ``"already generated"`` when a complete run with the same arguments
        was found (nothing is written then).

    Raises:
        DemoDataExistsError: the folder holds another run (or unknown files) and not ``overwrite``.
        ValueError: invalid arguments.
    """
    if image_size < 16 or image_size > 1024:
        raise ValueError(f"image_size must be in 16..1024, got {image_size}")
    if min(n_train, n_pretrain) < 0 or n_eval < 2:
        raise ValueError("n_train and n_pretrain must be >= 0 and n_eval >= 2")
    held_out = [tuple(cs) for cs in held_out]
    unknown = [cs for cs in held_out if cs not in all_combinations()]
    if unknown:
        raise ValueError(f"unknown held-out combinations {unknown}")
    arguments = {"seed": int(seed), "n_train": int(n_train), "n_pretrain": int(n_pretrain),
                 "n_eval": int(n_eval), "image_size": int(image_size),
                 "held_out": [list(cs) for cs in held_out], "format_version": FORMAT_VERSION}
    out = Path(out_dir)
    previous = read_manifest(out)
    if previous is not None:
        if previous.get("arguments") == arguments:
            return {**previous, "status": "already generated"}
        if not overwrite:
            diff = {k: (previous.get("arguments", {}).get(k), v) for k, v in arguments.items()
                    if previous.get("arguments", {}).get(k) != v}
            raise DemoDataExistsError(
                f"{out} already holds demo data generated with other arguments "
                f"(existing -> requested: {diff}); pass --overwrite to replace it")
    elif out.exists() and any(out.iterdir()) and not (out / _IN_PROGRESS).exists() and not overwrite:
        raise DemoDataExistsError(f"{out} is not empty and holds no demo-data manifest; "
                                  "choose an empty folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / _IN_PROGRESS).touch()  # marks the folder's content as ours while the run is partial
    _clear_outputs(out)

    b = _Builder(out, int(seed), held_out)
    pretrain = b.pretrain(n_pretrain)
    finetune = b.finetune(n_train)
    benches = {name: make(b, n_eval) for name, make in EVAL_BENCHMARKS.items()}
    _draw_all(b.jobs, image_size, workers, progress)
    for src, dst in benches["mme"].pop("links"):  # MME's release layout holds the images too
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(out / IMAGE_FOLDER / src, dst)
        except OSError:
            shutil.copyfile(out / IMAGE_FOLDER / src, dst)
    _write_json(out / "pretrain.json", pretrain)
    _write_json(out / "finetune.json", finetune)
    _write_json(out / "scenes.json", b.scenes, indent=None)

    # Paths relative to out_dir; per benchmark: "benchmark" (eval/score.py --benchmark),
    # "question_file", "annotation_files" (each one --annotation-file), optional "split_file".
    index = {"image_folder": IMAGE_FOLDER, "held_out_flag": "metadata.held_out", "benchmarks": {}}
    counts: dict[str, Any] = {
        "pretrain": len(pretrain), "finetune": len(finetune),
        "finetune_text_only": sum("image" not in r for r in finetune),
        "finetune_turns": sum(len(r["conversations"]) // 2 for r in finetune),
        "train_images": sum(1 for rel in b.scenes if rel.startswith("train/")),
        "eval_images": sum(1 for rel in b.scenes if rel.startswith("eval/"))}
    for name, info in benches.items():
        rows = info.pop("rows")
        index["benchmarks"][name] = {"benchmark": name, **info}
        counts[f"eval_{name}"] = len(rows)
        counts[f"eval_{name}_held_out"] = sum(r["metadata"]["held_out"] for r in rows)
    _write_json(out / "eval" / "index.json", index)

    manifest = {"generator": "mm_moslora.demo_data", "arguments": arguments, "counts": counts,
                "image_folder": IMAGE_FOLDER,
                "files": {"pretrain": "pretrain.json", "finetune": "finetune.json",
                          "scenes": "scenes.json", "eval_index": "eval/index.json"},
                "held_out_combinations": [f"{c} {s}" for c, s in held_out]}
    _write_json(out / "manifest.json", manifest, indent=2)  # last: its presence means complete
    (out / _IN_PROGRESS).unlink(missing_ok=True)
    return {**manifest, "status": "generated"}


# --------------------------------------------------------------------------------------------
# Baseline


def normalize_answer(answer: str) -> str:
    """Lower case, trimmed, without a trailing period: the exact-match form used here."""
    return answer.strip().lower().rstrip(".").strip()


def _load_records(obj: str | os.PathLike | list[dict]) -> list[dict]:
    if not isinstance(obj, (str, os.PathLike)):
        return list(obj)
    text = Path(obj).read_text()
    return json.loads(text) if text.lstrip().startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]


def majority_baseline(finetune_json: str | os.PathLike | list[dict],
                      question_file_records: str | os.PathLike | list[dict],
                      answers: dict | None = None) -> dict[str, dict]:
    """Per-question-type majority-answer baseline.

    For each question kind (``question_type_of`` on the prompts of both sides), the most common
    training answer of that kind is predicted for every evaluation question of the kind and scored
    by exact match (``normalize_answer``).

    Args:
        finetune_json: path of ``finetune.json`` or its loaded list.
        question_file_records: a question file (JSONL path) or its records.
        answers: ``{question_id: answer}``; default: each record's ``metadata["answer"]``.

    Returns:
        ``{qtype: {"majority_answer", "n_train", "n_eval", "correct", "accuracy"}}`` plus
        ``"overall": {"n_eval", "correct", "accuracy"}``.
    """
    by_type: dict[str, Counter] = defaultdict(Counter)
    for sample in _load_records(finetune_json):
        conv = sample["conversations"]
        for human, gpt in zip(conv[0::2], conv[1::2]):
            by_type[question_type_of(human["value"])][normalize_answer(gpt["value"])] += 1
    result: dict[str, dict] = {}
    for rec in _load_records(question_file_records):
        qtype = question_type_of(rec["text"])
        truth = answers[rec["question_id"]] if answers is not None else rec["metadata"]["answer"]
        counter = by_type.get(qtype, Counter())
        guess = counter.most_common(1)[0][0] if counter else None
        entry = result.setdefault(qtype, {"majority_answer": guess, "n_train": sum(counter.values()),
                                          "n_eval": 0, "correct": 0})
        entry["n_eval"] += 1
        entry["correct"] += int(guess is not None and guess == normalize_answer(str(truth)))
    for entry in result.values():
        entry["accuracy"] = entry["correct"] / entry["n_eval"]
    n = sum(e["n_eval"] for e in result.values())
    correct = sum(e["correct"] for e in result.values())
    result["overall"] = {"n_eval": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    return result
