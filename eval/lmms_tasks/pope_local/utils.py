"""The pope_local task's functions. Answers are read as yes/no by LLaVA's eval_pope rule, the rule of
eval/score.py's POPE scoring, so the scores here equal `eval/score.py --benchmark pope` on the same answers."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def yes_no(text):
    """LLaVA's eval_pope: the first sentence, commas removed; 'No', 'no' or 'not' as a word -> no, else yes."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def process_results(doc, results):
    row = {"question_id": doc["question_id"], "prediction": yes_no(results[0].strip()), "answer": doc["answer"],
           "category": doc["category"]}
    return {"pope_accuracy": row, "pope_f1_score": row, "pope_yes_ratio": row}


def accuracy(rows):
    return sum(r["prediction"] == r["answer"] for r in rows) / len(rows)


def f1_score(rows):
    tp = sum(r["prediction"] == "yes" and r["answer"] == "yes" for r in rows)
    fp = sum(r["prediction"] == "yes" and r["answer"] == "no" for r in rows)
    fn = sum(r["prediction"] == "no" and r["answer"] == "yes" for r in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def yes_ratio(rows):
    return sum(r["prediction"] == "yes" for r in rows) / len(rows)
