"""The demo's words: colours (with their RGB), shapes, backgrounds, count words and colour-mixing facts.

Vocabulary is small and regular on purpose (a tiny tokenizer is trained on it): 6 colours, 5 shapes,
digits, yes/no and a handful of fixed templates. ``HELD_OUT_COMBINATIONS`` are the (colour, shape) pairs
that never appear in a training image nor in any training text, to measure compositional generalisation.
Everything else in the package builds on these names, so this module imports nothing of it.
"""

from __future__ import annotations

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

Combo = tuple[str, str]  # (colour, shape)


def all_combinations() -> list[Combo]:
    """Every (colour, shape) pair of the vocabulary, in a fixed order."""
    return [(c, s) for c in COLORS for s in SHAPES]


def article(word: str) -> str:
    """ "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"
