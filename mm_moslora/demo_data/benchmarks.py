"""Benchmark look-alikes: ``eval/<bench>/`` question files in LLaVA's format plus each benchmark's
official ground-truth format, for VQAv2, POPE, ScienceQA, MME and GQA (``EVAL_BENCHMARKS``).

Each writer draws its scenes from its own random stream (``GenerationRun.eval_scene``: unseen layouts, half
with a held-out pair), writes its files and returns its entry of ``eval/index.json`` plus the question
records, whose ``metadata`` carries the answer and the held-out flags that the scores are split by.
The ground-truth files have the official layouts, which ``eval/score.py`` reads (docs/scoring.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .jsonfiles import write_json, write_jsonl
from .prompts import SHORT_ANSWER_SUFFIX, YES_NO_PROMPT, prompt_text, question_type_of
from .questions import (OPTION_LETTERS, QA, ask_color_verify, ask_count_verify, ask_mixed,
                        ask_multiple_choice, ask_position, ask_presence, ask_text_multiple_choice,
                        presence_question)
from .randomness import pick, sample
from .run import GenerationRun
from .scenes import Scene
from .vocabulary import COLORS, COUNT_WORDS, SHAPES, Combo, all_combinations

MME_SUBTASKS = ("existence", "count", "position", "color")
POPE_SPLITS = ("random", "popular", "adversarial")


def _focus(run: GenerationRun, scene: Scene, rng) -> int | None:
    """Prefer asking about the held-out object when the scene has one (60%)."""
    idx = [i for i, o in enumerate(scene.objects) if o.combo in run.held_out]
    return pick(rng, idx) if idx and rng.random() < 0.6 else None


def _metadata(run: GenerationRun, qa: QA, scene: Scene | None, **extra) -> dict:
    return {"question_type": question_type_of(prompt_text(qa)), "answer": qa.answer,
            "held_out": any(c in run.held_out for c in qa.combos),
            "scene_held_out": bool(scene and any(o.combo in run.held_out
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
            right if rng.random() < 0.6 else pick(rng, variants) for k in range(10)]


def _wrong_answer(qa: QA, rng) -> str:
    a = qa.answer
    if a in ("yes", "no"):
        return "no" if a == "yes" else "yes"
    if a.isdigit():
        return str(int(a) + 1 if a == "0" or rng.random() < 0.5 else int(a) - 1)
    if a in COLORS:
        return pick(rng, [c for c in COLORS if c != a])
    if a in SHAPES:
        return pick(rng, [s for s in SHAPES if s != a])
    return pick(rng, [f"{c} {s}" for c, s in all_combinations() if f"{c} {s}" != a])


VQAV2_MIX = {"color": 0.2, "shape": 0.15, "count": 0.2, "presence": 0.2, "position": 0.15,
             "logical": 0.1}
GQA_MIX = {"color": 0.2, "shape": 0.2, "presence": 0.2, "position": 0.2, "position_which": 0.1,
           "logical": 0.1}


def _eval_questions(run: GenerationRun, rng, scene: Scene, mix: dict[str, float], k: int) -> list[QA]:
    qas: list[QA] = []
    for _ in range(k):
        qa = ask_mixed(scene, rng, mix, None, focus=_focus(run, scene, rng),
                       avoid={q.question for q in qas})
        if qa is not None:
            qas.append(qa)
    return qas


def _make_vqav2(run: GenerationRun, n: int) -> dict:
    rng, d = run.rng("vqav2"), run.out / "eval" / "vqav2"
    rows, questions, annotations = [], [], []
    image_id = 0
    while len(rows) < n:
        image_id += 1
        scene = run.eval_scene(rng)
        rel = run.add_image(scene, f"eval/vqav2_{image_id:05d}.png")
        for k, qa in enumerate(_eval_questions(run, rng, scene, VQAV2_MIX, min(3, n - len(rows)))):
            qid = image_id * 10 + k
            rows.append({"question_id": qid, "image": rel, "text": prompt_text(qa),
                         "category": qa.qtype, "metadata": _metadata(run, qa, scene)})
            questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id,
                "question_type": _vqa_question_type(qa.question), "answer_type": qa.answer_type,
                "multiple_choice_answer": qa.answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(_annotator_answers(qa, rng))]})
    write_jsonl(d / "llava_vqav2_val.jsonl", rows)
    write_json(d / "v2_OpenEnded_mscoco_val_questions.json",
               {"info": {"description": "mm_moslora demo shapes"}, "task_type": "Open-Ended",
                "data_type": "mscoco", "data_subtype": "val2014", "questions": questions})
    write_json(d / "v2_mscoco_val_annotations.json",
               {"info": {"description": "mm_moslora demo shapes"}, "data_type": "mscoco",
                "data_subtype": "val2014", "annotations": annotations})
    return {"question_file": "eval/vqav2/llava_vqav2_val.jsonl",
            "annotation_files": ["eval/vqav2/v2_mscoco_val_annotations.json"],
            "annotations": {"questions": "eval/vqav2/v2_OpenEnded_mscoco_val_questions.json",
                            "annotations": "eval/vqav2/v2_mscoco_val_annotations.json"},
            "rows": rows}


def _pope_negatives(run: GenerationRun, scene: Scene, rng, split: str, k: int) -> list[Combo]:
    present = {o.combo for o in scene.objects}
    absent = [cs for cs in all_combinations() if cs not in present]
    if split == "popular":  # the most frequent objects of the training images
        ranked = sorted(absent, key=lambda cs: (-run.train_combo_counts[cs], all_combinations().index(cs)))
        return ranked[:k]
    if split == "adversarial":  # absent objects that look like present ones
        near = [cs for cs in absent if any(cs[0] == o.color or cs[1] == o.shape
                                           for o in scene.objects)]
        return sample(rng, near, k)
    return sample(rng, absent, k)


def _make_pope(run: GenerationRun, n: int) -> dict:
    """POPE: the same images in the three splits, k present + k absent objects per image."""
    rng, d = run.rng("pope"), run.out / "eval" / "pope"
    per_split = {s: [] for s in POPE_SPLITS}
    img = 0
    while n - len(per_split["random"]) >= 2:
        img += 1
        scene = run.eval_scene(rng)
        rel = run.add_image(scene, f"eval/pope_{img:05d}.png")
        k = min(3, len(scene.objects), (n - len(per_split["random"])) // 2)
        positives = sample(rng, [o.combo for o in scene.objects], k)
        for split in POPE_SPLITS:
            negatives = _pope_negatives(run, scene, rng, split, k)
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
                         "category": split, "metadata": _metadata(run, qa, scene, split=split)})
        write_jsonl(d / f"coco_pope_{split}.json", lines)
    write_jsonl(d / "llava_pope_test.jsonl", rows)
    return {"question_file": "eval/pope/llava_pope_test.jsonl",
            "annotation_files": [f"eval/pope/coco_pope_{s}.json" for s in POPE_SPLITS],
            "annotations": {s: f"eval/pope/coco_pope_{s}.json" for s in POPE_SPLITS}, "rows": rows}


def _make_scienceqa(run: GenerationRun, n: int) -> dict:
    rng, d = run.rng("scienceqa"), run.out / "eval" / "scienceqa"
    rows, problems = [], {}
    for k in range(n):
        pid = str(k + 1)
        scene = None
        if rng.random() < 0.25:
            qa = ask_text_multiple_choice(rng)
        else:
            qa = None
            while qa is None:
                scene = run.eval_scene(rng)
                qa = ask_multiple_choice(scene, rng, _focus(run, scene, rng))
        row: dict[str, Any] = {"question_id": pid}
        image_name = None
        if scene is not None:  # text-only problems have no image key, as in LLaVA's file
            row["image"] = run.add_image(scene, f"eval/sqa_{k + 1:05d}.png")
            image_name = Path(row["image"]).name
        row.update(text=prompt_text(qa, context=qa.hint), category=qa.subject,
                   metadata=_metadata(run, qa, scene))
        rows.append(row)
        problems[pid] = {"question": qa.question, "choices": list(qa.choices),
                         "answer": OPTION_LETTERS.index(qa.answer), "hint": qa.hint,
                         "image": image_name, "task": "closed choice", "split": "test",
                         "subject": qa.subject, "grade": "grade1" if scene else "grade2"}
    write_jsonl(d / "llava_test_CQM-A.jsonl", rows)
    write_json(d / "problems.json", problems)
    write_json(d / "pid_splits.json", {"test": list(problems)})
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


def _make_mme(run: GenerationRun, n: int) -> dict:
    rng, d = run.rng("mme"), run.out / "eval" / "mme"
    n_img = max(1, round(n / (2 * len(MME_SUBTASKS))))
    rows, links = [], []
    for subtask in MME_SUBTASKS:
        for k in range(n_img):
            pair = None
            while pair is None:
                scene = run.eval_scene(rng, accept=lambda s: len(s.objects) >= (2 if subtask == "position" else 1))
                pair = _mme_pair(subtask, scene, rng, _focus(run, scene, rng))
            stem = f"{k:04d}"
            rel = run.add_image(scene, f"eval/mme/{subtask}/{stem}.png")
            links.append((rel, d / "MME_Benchmark" / subtask / "images" / f"{stem}.png"))
            lines = []
            for qa, gt in zip(pair, ("Yes", "No")):
                question = qa.question + YES_NO_PROMPT
                lines.append(f"{question}\t{gt}\n")
                rows.append({
                    "question_id": f"{subtask}/{stem}.png#{gt.lower()}", "image": rel,
                    "text": question + SHORT_ANSWER_SUFFIX, "category": subtask,
                    "metadata": {"category": subtask, "image": f"{stem}.png", "question": question,
                                 **_metadata(run, qa, scene)}})
            txt = d / "MME_Benchmark" / subtask / "questions_answers_YN" / f"{stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("".join(lines))
    write_jsonl(d / "llava_mme.jsonl", rows)
    return {"question_file": "eval/mme/llava_mme.jsonl",
            "annotation_files": ["eval/mme/MME_Benchmark"],
            "annotations": {"mme_root": "eval/mme/MME_Benchmark"}, "rows": rows, "links": links}


def _make_gqa(run: GenerationRun, n: int) -> dict:
    rng, d = run.rng("gqa"), run.out / "eval" / "gqa"
    rows, gt = [], {}
    img = 0
    while len(rows) < n:
        img += 1
        scene = run.eval_scene(rng)
        stem = f"gqa_{img:05d}"
        rel = run.add_image(scene, f"eval/{stem}.png")
        for k, qa in enumerate(_eval_questions(run, rng, scene, GQA_MIX, min(3, n - len(rows)))):
            qid = str(img * 10 + k)
            rows.append({"question_id": qid, "image": rel, "text": prompt_text(qa),
                         "category": qa.qtype, "metadata": _metadata(run, qa, scene)})
            gt[qid] = {"imageId": stem, "question": qa.question, "answer": qa.answer,
                       "fullAnswer": qa.full_answer, "isBalanced": True,
                       "types": {"structural": qa.structural, "semantic": qa.semantic,
                                 "detailed": qa.detailed}}
    write_jsonl(d / "llava_gqa_testdev_balanced.jsonl", rows)
    write_json(d / "testdev_balanced_questions.json", gt)
    return {"question_file": "eval/gqa/llava_gqa_testdev_balanced.jsonl",
            "annotation_files": ["eval/gqa/testdev_balanced_questions.json"],
            "annotations": {"questions": "eval/gqa/testdev_balanced_questions.json"}, "rows": rows}


EVAL_BENCHMARKS: dict[str, Callable[[GenerationRun, int], dict]] = {
    "vqav2": _make_vqav2, "pope": _make_pope, "scienceqa": _make_scienceqa, "mme": _make_mme,
    "gqa": _make_gqa}
