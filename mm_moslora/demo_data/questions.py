"""Question generators: ``ask_*`` functions that write one question about a scene (or a text-only one)
together with its single checkable answer, as a ``QA``.

Each generator reads its answer off the ``Scene`` it asks about, so answers are right by construction.
Yes/no generators take ``want`` to fix the answer (benchmarks balance yes and no); ``allowed_combos``
keeps the held-out (colour, shape) pairs out of the objects a training question names. How a ``QA`` is
shown to the model (answer-format suffixes, options) is ``prompts.py``'s job.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .randomness import pick, sample
from .scenes import Scene, SceneObject, separated
from .vocabulary import COLOR_MIXING, COLORS, PLURALS, SHAPES, Combo, all_combinations, article

OPTION_LETTERS = "ABCD"  # multiple-choice option labels, in order


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
    return focus if focus in candidates else pick(rng, candidates)


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
        color = pick(rng, others)
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
        shape = pick(rng, scene.objects).shape
    else:
        shape = pick(rng, SHAPES)
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
        shape = (scene.objects[focus] if focus is not None else pick(rng, scene.objects)).shape
        hits = tuple(o.combo for o in scene.objects if o.shape == shape)
    yes = _want(rng, want)
    n = len(hits) if yes else pick(rng, [k for k in range(1, 5) if k != len(hits)])
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
    return pick(rng, pool)


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
                            separated(scene.objects[i], scene.objects[j], ax):
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
    i, j, axis = pick(rng, pairs)
    return scene.objects[i], scene.objects[j], axis


def ask_position(scene: Scene, rng, focus: int | None = None, want: bool | None = None) -> QA | None:
    """"Is the <A> left of / right of / above / below the <B>?" for two objects clearly apart along
    that axis; None for one-object scenes."""
    picked = _pick_separated_pair(scene, rng, focus)
    if picked is None:
        return None
    a, b, axis = picked
    yes = _want(rng, want)
    rel = pick(rng, [r for r, (ax, sm) in _RELATIONS.items()
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
    word = pick(rng, [w for w, (ax, _) in _WHICH.items() if ax == axis])
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
    op = "or" if yes and len(present) < 2 else pick(rng, ["and", "or"])  # keeps yes/no balanced
    # number of the two named objects that are present, for the wanted truth value
    n_present = {("and", True): 2, ("and", False): int(rng.integers(0, 2)),
                 ("or", True): int(rng.integers(1, 3)), ("or", False): 0}[(op, yes)]
    n_present = min(n_present, len(present))
    named = sample(rng, present, n_present)
    if focus is not None and n_present and scene.objects[focus].combo not in named:
        named[0] = scene.objects[focus].combo
    while len(named) < 2:
        combo = _absent_combo(scene, rng, allowed_combos, exclude=named)
        if combo is None:
            return None
        named.append(combo)
    named = sample(rng, named, 2)
    (c1, s1), (c2, s2) = named
    question = f"Is there {article(c1)} {c1} {s1} {op} {article(c2)} {c2} {s2} in the image?"
    return QA(question, _yes_no(yes), "logical",
              "yes/no", f"{'Yes' if yes else 'No'}.", "logical", "obj",
              "existAttrAnd" if op == "and" else "existAttrOr", tuple(named))


def _with_options(qa: QA, correct: str, pool: Sequence[str], rng, n_options: int) -> QA:
    """Turn a short-answer QA into a multiple-choice one (options shuffled, answer a letter)."""
    distractors = sample(rng, [p for p in pool if p != correct], n_options - 1)
    options = sample(rng, [correct] + distractors, n_options)
    letter = OPTION_LETTERS[options.index(correct)]
    return QA(qa.question, letter, "multiple_choice", "other", f"The answer is {letter}. {correct}",
              qa.structural, qa.semantic, qa.detailed, qa.combos, tuple(options), qa.hint,
              qa.subject)


def ask_multiple_choice(scene: Scene, rng, focus: int | None = None,
                        n_options: int | None = None) -> QA | None:
    """A colour, shape, count or "which is further ..." question with options A-D (2 for "which").
    ``qtype`` is "multiple_choice"; ``detailed`` keeps the inner question's kind."""
    kind = pick(rng, ["color", "shape", "count", "which"])
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
    pair, result = pick(rng, list(COLOR_MIXING.items()))
    a, b = sample(rng, sorted(pair), 2)
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
    word = pick(rng, list(COLORS) + list(SHAPES))
    kind = "color" if word in COLORS else "shape"
    return QA(f"Is the word {word} a color or a shape?", kind, "word_category", "other",
              f"The word {word} is a {kind}.", subject="language science")


def ask_alphabetical(rng) -> QA:
    """"Which word comes first in alphabetical order, circle or blue?"."""
    a, b = sample(rng, list(COLORS) + list(SHAPES), 2)
    first = min(a, b)
    return QA(f"Which word comes first in alphabetical order, {a} or {b}?", first, "alphabetical",
              "other", f"The word {first} comes first.", subject="language science")


def ask_text_multiple_choice(rng) -> QA:
    """ScienceQA-style text-only problem: colour mixing (natural science) or word questions
    (language science), with 2-4 options."""
    kind = pick(rng, ["mixing", "category", "alphabetical"])
    if kind == "mixing":
        qa = ask_color_mixing(rng)
        qa = QA(qa.question.replace("What color do you get", "Which color do you get"), qa.answer,
                qa.qtype, qa.answer_type, qa.full_answer, hint=qa.hint, subject=qa.subject)
        return _with_options(qa, qa.answer, list(COLORS), rng, int(rng.integers(2, 5)))
    if kind == "category":
        want = pick(rng, ["color", "shape"])
        correct = pick(rng, list(COLORS) if want == "color" else list(SHAPES))
        pool = list(SHAPES) if want == "color" else list(COLORS)
        qa = QA(f"Which word is a {want}?", correct, "word_category", "other", "",
                subject="language science")
        return _with_options(qa, correct, pool, rng, int(rng.integers(2, 5)))
    words = sample(rng, list(COLORS) + list(SHAPES), int(rng.integers(2, 4)))
    qa = QA("Which word would you find first in alphabetical order?", min(words), "alphabetical",
            "other", "", subject="language science")
    return _with_options(qa, min(words), words, rng, len(words))


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
