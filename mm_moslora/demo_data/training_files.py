"""The LLaVA training records: ``pretrain.json`` (one caption per image) and ``finetune.json`` (1-3 question
turns per image, about 5% text-only samples without an ``image`` key).

Records are LLaVA's (``id``, ``image``, ``conversations`` of human/gpt turns, ``<image>`` in the first human
turn). The prompt wording varies (the answer-format suffix mostly, sometimes none or MME's yes/no ending), so
a model trained here answers benchmark prompts and plain questions alike.
"""

from __future__ import annotations

from .captions import caption
from .prompts import IMAGE_TOKEN, prompt_text
from .questions import (QA, TRAIN_QUESTION_MIX, ask_alphabetical, ask_arithmetic, ask_color_mixing,
                        ask_mixed, ask_text_multiple_choice, ask_word_category)
from .randomness import pick
from .run import GenerationRun


def pretrain_records(run: GenerationRun, n: int) -> list[dict]:
    rng, rows = run.rng("pretrain"), []
    for k in range(n):
        scene = run.train_scene(rng)
        rel = run.add_image(scene, f"train/p{k:06d}.png")
        rows.append({"id": f"p{k:06d}", "image": rel, "conversations": [
            {"from": "human", "value": IMAGE_TOKEN + "\n"},
            {"from": "gpt", "value": caption(scene)}]})
    return rows


def finetune_records(run: GenerationRun, n: int) -> list[dict]:
    rng, rows = run.rng("finetune"), []
    for k in range(n):
        sid = f"f{k:06d}"
        if rng.random() < 0.05:  # text-only sample: no image key
            gen = pick(rng, [ask_color_mixing, ask_arithmetic, ask_word_category,
                             ask_alphabetical, ask_text_multiple_choice])
            qa = gen(rng)
            rows.append({"id": sid, "conversations": _turns([qa], rng, image=False)})
            continue
        scene = run.train_scene(rng)
        n_turns = int(rng.choice(3, p=[0.4, 0.35, 0.25])) + 1
        qas: list[QA] = []
        for _ in range(n_turns):
            qa = ask_mixed(scene, rng, TRAIN_QUESTION_MIX, run.allowed,
                           avoid={q.question for q in qas})
            if qa is not None:
                qas.append(qa)
        rel = run.add_image(scene, f"train/{sid}.png")
        rows.append({"id": sid, "image": rel, "conversations": _turns(qas, rng, image=True)})
    return rows


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
