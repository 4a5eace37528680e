"""Prompts: how a ``QA`` is written into the model's input, and the question kind read back from a prompt.

Training and evaluation share ``prompt_text`` (LLaVA-1.5's answer-format suffixes, ScienceQA's context line
and lettered options), so a model sees the same wording in both; ``question_type_of`` recognises the
templates again, which lets the majority baseline group training turns, which carry no type field.
"""

from __future__ import annotations

import re

from .questions import OPTION_LETTERS, QA
from .vocabulary import COLORS

# LLaVA-1.5's answer-format prompts, appended to questions in training and evaluation alike.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
YES_NO_PROMPT = " Please answer yes or no."  # MME's own question ending
IMAGE_TOKEN = "<image>"


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
