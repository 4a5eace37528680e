"""Tests of the procedural demo data: determinism, hold-outs, answer correctness, file formats,
manifest/re-run behaviour and the CLI. Answers are re-derived here from the stored scenes by an
oracle written independently of the generator."""

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mm_moslora import demo_data as dd
from mm_moslora.demo_data import write

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(seed=0, n_train=150, n_pretrain=80, n_eval=40, image_size=64, progress=False)
HELD_OUT = {("purple", "triangle"), ("yellow", "circle"), ("green", "star")}
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    dd.generate(out, **SMALL)
    return out


@pytest.fixture(scope="module")
def scenes(data) -> dict[str, dict]:
    return json.loads((data / "scenes.json").read_text())


# ------------------------------------------------------------------------------------------
# Oracle: the answer of a templated question, from a scene dict (no generator code involved)

def _obj(scene, color=None, shape=None):
    hits = [o for o in scene["objects"]
            if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape)]
    return hits


def _the(scene, color, shape):
    hits = _obj(scene, color, shape)
    assert len(hits) == 1, f"ambiguous or missing referent {color} {shape}"
    return hits[0]


def _plural_to_shape(word):
    return {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star",
            "crosses": "cross", "objects": None, "object": None}.get(word, word)


def _clearly(a, b, axis):
    return abs(a[axis] - b[axis]) >= (a["size"] + b["size"]) / 2


def oracle(question: str, scene: dict | None) -> str:
    q = question.replace(" Please answer yes or no.", "")
    yn = lambda flag: "yes" if flag else "no"  # noqa: E731
    if m := re.fullmatch(r"What colou?r do you get by mixing (\w+) and (\w+)\?", q):
        return {frozenset({"red", "blue"}): "purple", frozenset({"red", "yellow"}): "orange",
                frozenset({"blue", "yellow"}): "green"}[frozenset(m.groups())]
    if m := re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", q):
        a, b = int(m[1]), int(m[3])
        return str(a + b if m[2] == "plus" else a - b)
    if m := re.fullmatch(r"Is the word (\w+) a color or a shape\?", q):
        return "color" if m[1] in dd.COLORS else "shape"
    if m := re.fullmatch(r"Which word comes first in alphabetical order, (\w+) or (\w+)\?", q):
        return sorted([m[1], m[2]])[0]
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        return _the(scene, None, m[1])["color"]
    if m := re.fullmatch(r"Is the (\w+) (\w+)\?", q):
        return yn(_the(scene, None, m[1])["color"] == m[2])
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        return _the(scene, m[1], None)["shape"]
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(len(_obj(scene, None, _plural_to_shape(m[1]))))
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\d) (\w+) in the image\?", q):
        return yn(len(_obj(scene, None, _plural_to_shape(m[2]))) == int(m[1]))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) (and|or) an? (\w+) (\w+) in the image\?", q):
        a, b = bool(_obj(scene, m[1], m[2])), bool(_obj(scene, m[4], m[5]))
        return yn(a and b if m[3] == "and" else a or b)
    if m := re.fullmatch(r"Is there (an?) (\w+) (\w+) in the image\?", q):
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a")
        return yn(bool(_obj(scene, m[2], m[3])))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", q):
        a, b = _the(scene, m[1], m[2]), _the(scene, m[4], m[5])
        axis = "x" if m[3] in ("left of", "right of") else "y"
        assert _clearly(a, b, axis), "relation asked about objects that overlap on that axis"
        return yn(a[axis] < b[axis] if m[3] in ("left of", "above") else a[axis] > b[axis])
    if m := re.fullmatch(r"Which is (further left|further right|higher|lower), "
                         r"the (\w+) (\w+) or the (\w+) (\w+)\?", q):
        a, b = _the(scene, m[2], m[3]), _the(scene, m[4], m[5])
        axis = "x" if "further" in m[1] else "y"
        assert _clearly(a, b, axis)
        first = a[axis] < b[axis] if m[1] in ("further left", "higher") else a[axis] > b[axis]
        winner = a if first else b
        return f"{winner['color']} {winner['shape']}"
    raise AssertionError(f"no oracle for {question!r}")


def oracle_choice(stem: str, options: list[str], scene: dict | None) -> int:
    """Index of the right option of a multiple-choice question."""
    if m := re.fullmatch(r"Which word is a (color|shape)\?", stem):
        pool = dd.COLORS if m[1] == "color" else dd.SHAPES
        right = [o for o in options if o in pool]
    elif stem == "Which word would you find first in alphabetical order?":
        right = [min(options)]
    else:
        right = [oracle(stem.replace("Which color do you get", "What color do you get"), scene)]
    assert len(right) == 1 and options.count(right[0]) == 1, (stem, options)
    return options.index(right[0])


def split_prompt(text: str) -> tuple[str, list[str], str | None]:
    """(question stem, options, context) of a prompt; suffixes and <image> removed."""
    text = text.replace("<image>\n", "")
    for suffix in (SHORT, LETTER):
        text = text.removesuffix(suffix)
    context = None
    if text.startswith("Context: "):
        context, text = text.split("\n", 1)
    lines = text.split("\n")
    options = [line[3:] for line in lines[1:] if re.match(r"[A-D]\. ", line)]
    assert len(options) == len(lines) - 1
    return lines[0], options, context


def check_answer(text: str, answer: str, scene: dict | None) -> None:
    stem, options, _ = split_prompt(text)
    if options:
        assert answer == "ABCD"[oracle_choice(stem, options, scene)], text
    else:
        assert answer == oracle(stem, scene), text


# ------------------------------------------------------------------------------------------
# Scenes and rendering


def test_sample_scene_rules():
    rng = np.random.default_rng(123)
    allowed = [cs for cs in dd.all_combinations() if cs not in HELD_OUT]
    for _ in range(300):
        scene = dd.sample_scene(rng, allowed_combos=allowed)
        objs = scene.objects
        assert 1 <= len(objs) <= 4
        assert len({o.color for o in objs}) == len(objs)  # colours distinct
        assert not {o.combo for o in objs} & HELD_OUT
        for o in objs:
            assert dd.MIN_SIZE <= o.size <= dd.MAX_SIZE
            assert o.size / 2 <= o.x <= 1 - o.size / 2 and o.size / 2 <= o.y <= 1 - o.size / 2
        for i, a in enumerate(objs):  # bounding boxes disjoint
            for b in objs[i + 1:]:
                assert abs(a.x - b.x) >= (a.size + b.size) / 2 or abs(a.y - b.y) >= (a.size + b.size) / 2
    forced = dd.sample_scene(rng, n_objects=3, required_combos=[("purple", "triangle")])
    assert len(forced.objects) == 3 and ("purple", "triangle") in {o.combo for o in forced.objects}


@pytest.mark.parametrize("size", [64, 224])
def test_render_scene_colours_and_background(size):
    rng = np.random.default_rng(7)
    for _ in range(20):
        scene = dd.sample_scene(rng)
        img = np.asarray(dd.render_scene(scene, size))
        assert img.shape == (size, size, 3)
        assert tuple(img[0, 0]) == dd.BACKGROUNDS[scene.background]
        for o in scene.objects:  # every shape covers its centre with its exact palette colour
            px = img[int(o.y * size), int(o.x * size)]
            assert tuple(px) == dd.COLORS[o.color], (o, px)
    assert dd.render_scene(scene, size).tobytes() == dd.render_scene(scene, size).tobytes()


def test_caption_names_every_object():
    rng = np.random.default_rng(3)
    for _ in range(100):
        scene = dd.sample_scene(rng)
        cap = dd.caption(scene)
        named = re.findall(r"\ban? (\w+) (\w+)", cap)
        assert sorted(named) == sorted(o.combo for o in scene.objects), cap
        if len(scene.objects) == 2 and " left of " in cap:
            (c1, s1), (c2, s2) = named
            a, b = _the(scene.to_dict(), c1, s1), _the(scene.to_dict(), c2, s2)
            assert a["x"] < b["x"] and _clearly(a, b, "x")


def test_question_generators_agree_with_oracle():
    rng = np.random.default_rng(11)
    kinds = list(dd.TRAIN_QUESTION_MIX)
    seen = Counter()
    for _ in range(400):
        scene = dd.sample_scene(rng)
        for kind in kinds:
            for want in (None, True, False) if kind in ("presence", "position", "logical",
                                                        "color_verify", "count_verify") else (None,):
                qa = dd.ask(kind, scene, rng, want=want)
                if qa is None:
                    continue
                check_answer(dd.prompt_text(qa), qa.answer, scene.to_dict())
                if want is not None:
                    assert qa.answer == ("yes" if want else "no")
                assert dd.question_type_of(dd.prompt_text(qa)) == kind
                seen[kind] += 1
    assert set(seen) == set(kinds)
    for gen in (dd.ask_color_mixing, dd.ask_arithmetic, dd.ask_word_category, dd.ask_alphabetical,
                dd.ask_text_multiple_choice):
        for _ in range(30):
            qa = gen(rng)
            check_answer(dd.prompt_text(qa), qa.answer, None)


# ------------------------------------------------------------------------------------------
# Generated files


def test_deterministic_and_independent_of_workers(data, tmp_path):
    again = tmp_path / "again"
    dd.generate(again, **{**SMALL, "workers": 2})
    first, second = _hashes(data), _hashes(again)
    assert first == second
    other = tmp_path / "other"
    dd.generate(other, **{**SMALL, "seed": SMALL["seed"] + 1})
    assert _hashes(other)["finetune.json"] != first["finetune.json"]


def test_llava_training_files(data, scenes):
    pretrain = json.loads((data / "pretrain.json").read_text())
    finetune = json.loads((data / "finetune.json").read_text())
    assert len(pretrain) == SMALL["n_pretrain"] and len(finetune) == SMALL["n_train"]
    for rec in pretrain:
        assert (data / "images" / rec["image"]).is_file() and rec["image"].startswith("train/")
        human, gpt = rec["conversations"]
        assert human == {"from": "human", "value": "<image>\n"} and gpt["from"] == "gpt"
        named = re.findall(r"\ban? (\w+) (\w+)", gpt["value"])
        assert sorted(map(list, named)) == sorted([o["color"], o["shape"]]
                                                  for o in scenes[rec["image"]]["objects"])
    n_turns, n_suffixed, text_only = Counter(), 0, 0
    for rec in finetune:
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        n_turns[len(conv) // 2] += 1
        joined = "".join(t["value"] for t in conv)
        if "image" in rec:
            assert (data / "images" / rec["image"]).is_file()
            assert conv[0]["value"].startswith("<image>\n") and joined.count("<image>") == 1
        else:
            text_only += 1
            assert "<image>" not in joined
        scene = scenes.get(rec.get("image"))
        for human, gpt in zip(conv[0::2], conv[1::2]):
            check_answer(human["value"], gpt["value"], scene)
            n_suffixed += human["value"].endswith((SHORT, LETTER))
    assert set(n_turns) == {1, 2, 3}
    assert 0 < text_only < 0.15 * len(finetune)
    assert n_suffixed > 0.7 * sum(k * v for k, v in n_turns.items())
    assert any(h["value"].endswith(LETTER) for r in finetune for h in r["conversations"][0::2])


def test_held_out_combinations_never_in_training(data, scenes):
    phrases = [f"{c} {s}" for c, s in HELD_OUT]
    for rel, scene in scenes.items():
        combos = {(o["color"], o["shape"]) for o in scene["objects"]}
        if rel.startswith("train/"):
            assert not combos & HELD_OUT, rel
    training_text = (data / "pretrain.json").read_text() + (data / "finetune.json").read_text()
    assert not any(p in training_text for p in phrases)
    train_sigs = {dd.Scene.from_dict(s).signature() for r, s in scenes.items() if r.startswith("train/")}
    eval_sigs = [dd.Scene.from_dict(s).signature() for r, s in scenes.items() if r.startswith("eval/")]
    assert eval_sigs and not train_sigs & set(eval_sigs)
    assert any(any((o["color"], o["shape"]) in HELD_OUT for o in s["objects"])
               for r, s in scenes.items() if r.startswith("eval/"))


def _question_files(data):
    index = json.loads((data / "eval" / "index.json").read_text())
    return {name: _jsonl(data / info["question_file"]) for name, info in index["benchmarks"].items()}


def _mentioned_combos(text: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a prompt names: "red circle" or "Is the circle red?"."""
    words = re.findall(r"\w+", text)
    pairs = {(a, b) for a, b in zip(words, words[1:]) if a in dd.COLORS and b in dd.SHAPES}
    if m := re.match(r"Is the (\w+) (\w+)\?", text):
        pairs.add((m[2], m[1]))
    return pairs


def test_eval_records_answers_and_held_out_flags(data, scenes):
    files = _question_files(data)
    assert set(files) == {"vqav2", "pope", "scienceqa", "mme", "gqa"}
    for bench, rows in files.items():
        assert rows and len({r["question_id"] for r in rows}) == len(rows), bench
        assert any(r["metadata"]["held_out"] for r in rows), bench
        assert not all(r["metadata"]["held_out"] for r in rows), bench
        for r in rows:
            assert set(r) >= {"question_id", "text", "category"} and "<image>" not in r["text"]
            assert r["text"].endswith(LETTER if bench == "scienceqa" else SHORT)
            scene = scenes.get(r.get("image"))
            if "image" in r:
                assert (data / "images" / r["image"]).is_file()
            check_answer(r["text"], r["metadata"]["answer"], scene)
            mentioned = bool(_mentioned_combos(r["text"]) & HELD_OUT)
            in_scene = scene is not None and any((o["color"], o["shape"]) in HELD_OUT
                                                 for o in scene["objects"])
            if mentioned:
                assert r["metadata"]["held_out"], r
            if r["metadata"]["held_out"]:
                assert mentioned or in_scene, r
            assert r["metadata"]["scene_held_out"] == in_scene


def _vqa_normalize(ans: str) -> str:
    words = re.sub(r"[^\w\s]", "", ans.lower()).split()
    numbers = {w: str(i) for i, w in enumerate(dd.COUNT_WORDS)}
    return " ".join(numbers.get(w, w) for w in words if w not in ("a", "an", "the"))


def test_vqav2_official_format(data):
    d = data / "eval" / "vqav2"
    rows = _jsonl(d / "llava_vqav2_val.jsonl")
    questions = json.loads((d / "v2_OpenEnded_mscoco_val_questions.json").read_text())["questions"]
    anns = json.loads((d / "v2_mscoco_val_annotations.json").read_text())["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in anns] == \
        [r["question_id"] for r in rows]
    varied = 0
    for q, a, r in zip(questions, anns, rows):
        assert isinstance(q["image_id"], int) and isinstance(q["question_id"], int)
        assert r["text"] == q["question"] + SHORT and a["image_id"] == q["image_id"]
        assert a["answer_type"] in ("yes/no", "number", "other") and a["question_type"]
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(x["answer_confidence"] == "yes" for x in a["answers"])
        assert a["multiple_choice_answer"] == r["metadata"]["answer"]
        normalized = Counter(_vqa_normalize(x["answer"]) for x in a["answers"])
        assert normalized.most_common(1)[0][0] == _vqa_normalize(a["multiple_choice_answer"])
        varied += len({x["answer"] for x in a["answers"]}) > 1
    assert varied > len(anns) / 2  # annotator variants make normalisation matter


def test_pope_official_format(data):
    d = data / "eval" / "pope"
    rows = {r["question_id"]: r for r in _jsonl(d / "llava_pope_test.jsonl")}
    images = {}
    for split in dd.POPE_SPLITS:
        lines = _jsonl(d / f"coco_pope_{split}.json")
        labels = Counter(x["label"] for x in lines)
        assert labels["yes"] == labels["no"] > 0 and set(labels) == {"yes", "no"}
        for x in lines:
            assert set(x) == {"question_id", "image", "text", "label"}
            row = rows[x["question_id"]]
            assert row["category"] == split and row["text"] == x["text"] + SHORT
            assert row["image"] == x["image"] and re.fullmatch(r"Is there an? \w+ \w+ in the image\?", x["text"])
        images[split] = [x["image"] for x in lines]
    assert images["random"] == images["popular"] == images["adversarial"]


def test_pope_adversarial_negatives_share_colour_or_shape(data, scenes):
    for x in _jsonl(data / "eval" / "pope" / "coco_pope_adversarial.json"):
        if x["label"] == "no":
            color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", x["text"]).groups()
            objs = scenes[x["image"]]["objects"]
            assert any(o["color"] == color or o["shape"] == shape for o in objs)


def test_scienceqa_official_format(data, scenes):
    d = data / "eval" / "scienceqa"
    rows = {r["question_id"]: r for r in _jsonl(d / "llava_test_CQM-A.jsonl")}
    problems = json.loads((d / "problems.json").read_text())
    assert json.loads((d / "pid_splits.json").read_text())["test"] == list(problems) == list(rows)
    with_image = 0
    for pid, p in problems.items():
        assert set(p) >= {"question", "choices", "answer", "hint", "image", "split", "subject", "grade"}
        assert p["split"] == "test" and 0 <= p["answer"] < len(p["choices"]) <= 4
        row = rows[pid]
        assert row["text"].startswith("Context: ") and row["text"].endswith(LETTER)
        stem, options, _ = split_prompt(row["text"])
        assert stem == p["question"] and options == p["choices"]
        if p["image"] is None:
            assert "image" not in row
        else:
            with_image += 1
            assert Path(row["image"]).name == p["image"]
        assert p["answer"] == oracle_choice(stem, options, scenes.get(row.get("image")))
    assert 0 < with_image < len(problems)


def test_mme_release_layout(data):
    d = data / "eval" / "mme"
    rows = _jsonl(d / "llava_mme.jsonl")
    by_image = {}
    for r in rows:
        meta = r["metadata"]
        assert meta["category"] == r["category"] and meta["category"] in dd.MME_SUBTASKS
        assert r["text"] == meta["question"] + SHORT
        assert r["image"] == f"eval/mme/{meta['category']}/{meta['image']}"
        by_image.setdefault((meta["category"], meta["image"]), []).append(r)
    assert {c for c, _ in by_image} == set(dd.MME_SUBTASKS)
    for (subtask, name), recs in by_image.items():
        stem = Path(name).stem
        release_img = d / "MME_Benchmark" / subtask / "images" / name
        assert release_img.read_bytes() == (data / "images" / recs[0]["image"]).read_bytes()
        lines = (d / "MME_Benchmark" / subtask / "questions_answers_YN" / f"{stem}.txt").read_text()
        pairs = [line.split("\t") for line in lines.splitlines()]
        assert [a for _, a in pairs] == ["Yes", "No"]
        assert [q for q, _ in pairs] == [r["metadata"]["question"] for r in recs]
        assert all(q.endswith("Please answer yes or no.") for q, _ in pairs)
        assert [r["metadata"]["answer"] for r in recs] == ["yes", "no"]


def test_gqa_official_format(data):
    d = data / "eval" / "gqa"
    rows = _jsonl(d / "llava_gqa_testdev_balanced.jsonl")
    gt = json.loads((d / "testdev_balanced_questions.json").read_text())
    assert [r["question_id"] for r in rows] == list(gt)
    for r in rows:
        g = gt[r["question_id"]]
        assert r["text"] == g["question"] + SHORT and g["answer"] == r["metadata"]["answer"]
        assert Path(r["image"]).stem == g["imageId"] and g["fullAnswer"]
        assert g["types"]["structural"] in ("query", "verify", "compare", "logical")
        assert g["types"]["semantic"] in ("attr", "obj", "rel") and g["types"]["detailed"]


def test_index_and_manifest(data):
    index = json.loads((data / "eval" / "index.json").read_text())
    assert index["image_folder"] == "images"
    for name, info in index["benchmarks"].items():
        assert info["benchmark"] == name and (data / info["question_file"]).is_file()
        for path in [*info["annotations"].values(), *info["annotation_files"]]:
            assert (data / path).exists()
    manifest = dd.read_manifest(data)
    args = {k: v for k, v in SMALL.items() if k != "progress"}
    assert {k: manifest["arguments"][k] for k in args} == args
    assert manifest["counts"]["finetune"] == SMALL["n_train"]
    assert manifest["counts"]["eval_vqav2"] == SMALL["n_eval"]
    assert not (data / write._IN_PROGRESS).exists()


def test_perfect_answers_score_full_marks_with_eval_score(data):
    """The ground truth and index.json work with the project's scorer: right answers get 100%."""
    sys.path.insert(0, str(REPO))
    from eval import score

    index = json.loads((data / "eval" / "index.json").read_text())
    for name, info in index["benchmarks"].items():
        answers = []
        for r in _jsonl(data / info["question_file"]):
            text = r["metadata"]["answer"]
            answers.append({"question_id": r["question_id"], "prompt": r["text"],
                            "text": text.capitalize() if name == "mme" else text,
                            "metadata": r["metadata"]})
        result = score.score_benchmark(
            info["benchmark"], answers, [data / p for p in info["annotation_files"]],
            split_file=data / info["split_file"] if info.get("split_file") else None)
        assert result["overall"] == (200 * len(dd.MME_SUBTASKS) if name == "mme" else 100), name


def test_majority_baseline():
    finetune = [
        {"id": "1", "image": "x.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?" + SHORT},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is there a red circle in the image?"},
            {"from": "gpt", "value": "no"}]},
        {"id": "2", "image": "y.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the star?"},
            {"from": "gpt", "value": "red"}]},
        {"id": "3", "image": "z.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the cross?"},
            {"from": "gpt", "value": "blue"}]}]
    records = [
        {"question_id": 1, "text": "What color is the square?" + SHORT, "metadata": {"answer": "Red."}},
        {"question_id": 2, "text": "What color is the star?" + SHORT, "metadata": {"answer": "blue"}},
        {"question_id": 3, "text": "Is there a blue star in the image?", "metadata": {"answer": "yes"}},
        {"question_id": 4, "text": "How many stars are there?", "metadata": {"answer": "1"}}]
    result = dd.majority_baseline(finetune, records)
    assert result["color"] == {"majority_answer": "red", "n_train": 3, "n_eval": 2, "correct": 1,
                               "accuracy": 0.5}
    assert result["presence"]["majority_answer"] == "no" and result["presence"]["accuracy"] == 0
    assert result["count"]["majority_answer"] is None and result["count"]["accuracy"] == 0
    assert result["overall"] == {"n_eval": 4, "correct": 1, "accuracy": 0.25}
    assert dd.majority_baseline(finetune, records, answers={1: "blue", 2: "red", 3: "no", 4: "1"}) \
        ["overall"]["correct"] == 2


def test_majority_baseline_on_generated_pope_is_chance(data):
    result = dd.majority_baseline(data / "finetune.json", data / "eval" / "pope" / "llava_pope_test.jsonl")
    assert set(result) == {"presence", "overall"} and result["overall"]["accuracy"] == 0.5


# ------------------------------------------------------------------------------------------
# Re-run behaviour and CLI


def test_rerun_interrupt_and_overwrite(tmp_path, monkeypatch):
    small = {**SMALL, "n_train": 20, "n_pretrain": 10, "n_eval": 8}
    out = tmp_path / "d"
    first = dd.generate(out, **small)
    assert first["status"] == "generated"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = dd.generate(out, **small)
    assert again["status"] == "already generated"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(dd.DemoDataExistsError, match="seed"):
        dd.generate(out, **{**small, "seed": 5})
    fresh = _hashes(out)

    # an interrupted run leaves no manifest, so it is not taken for complete and is redone
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "draw_all", boom)
    with pytest.raises(KeyboardInterrupt):
        dd.generate(out, **{**small, "seed": 5}, overwrite=True)
    assert dd.read_manifest(out) is None
    monkeypatch.undo()
    assert dd.generate(out, **small)["status"] == "generated"
    assert _hashes(out) == fresh

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(dd.DemoDataExistsError, match="not empty"):
        dd.generate(foreign, **small)
    with pytest.raises(ValueError):
        dd.generate(tmp_path / "bad", **{**small, "held_out": [("pink", "circle")]})


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    small = ["--out", str(out), "--n-train", "20", "--n-pretrain", "10", "--n-eval", "8",
             "--image-size", "96", "--workers", "2"]
    run = _cli(*small)
    assert run.returncode == 0, run.stderr
    assert "drawing images" in run.stderr  # tqdm progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arguments"]["image_size"] == 96
    from PIL import Image
    assert Image.open(out / "images" / json.loads((out / "pretrain.json").read_text())[0]["image"]).size == (96, 96)
    run = _cli(*small)
    assert run.returncode == 0 and "already generated" in run.stdout
    run = _cli(*small[:-2], "--seed", "3")
    assert run.returncode != 0 and "--overwrite" in run.stderr
    run = _cli(*small[:-2], "--seed", "3", "--overwrite")
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "manifest.json").read_text())["arguments"]["seed"] == 3
