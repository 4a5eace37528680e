"""lmms-eval adapter: Instances in, the engine's own answers out; log-likelihoods; lookup by the name `mm_moslora`.

lmms_eval is imported unconditionally: without it these tests fail rather than skip (scripts/setup_env.sh installs
it through the `eval` extra, with its dependencies).
"""
from __future__ import annotations

import importlib.metadata
import math

import lmms_eval.models
import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.registry_v2 import ModelRegistryV2

from mm_moslora.data.conversation import IGNORE_INDEX, tokenize_conversation
from mm_moslora.infer import Request
from mm_moslora.integrations import LMMS_EVAL_MODEL_NAME, lmms_eval_manifest
from mm_moslora.integrations.lmms_eval import MMMoSLoRA, generation_settings

TASK, SPLIT = "toy", "test"


@pytest.fixture(scope="module")
def files(tiny_checkpoint_files):
    return tiny_checkpoint_files


@pytest.fixture(scope="module")
def adapter(files):
    return MMMoSLoRA(pretrained=str(files[0]), device="cpu", dtype="fp32", batch_size=3)


def doc_to_visual(doc: dict) -> list:
    return doc["images"]


def make_docs(images) -> list[dict]:
    """Contexts as lmms-eval tasks write them: mostly without `<image>`, one with it inline, one text-only."""
    return [{"question": "What is in the image?", "images": [images[0]]},
            {"question": "Is there a square? Answer yes or no.", "images": [images[1]]},
            {"question": "Describe the colours.", "images": [images[2]]},
            {"question": "Compare the two pictures.", "images": [images[0], images[3]]},
            {"question": "Look at <image> and name the colour.", "images": [images[3]]},
            {"question": "Just text, no picture.", "images": []},
            {"question": "Count the objects in this picture, please.", "images": [images[1]]}]


def expected_user_turn(doc: dict) -> str:
    """Where LLaVA's lmms-eval model puts the images: "<image> <image>\\n" in front unless the text has them."""
    if not doc["images"] or "<image>" in doc["question"]:
        return doc["question"]
    return " ".join(["<image>"] * len(doc["images"])) + "\n" + doc["question"]


def instance(request_type: str, arguments: tuple, doc_id: int) -> Instance:
    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_generate_until_equals_engine(adapter, files):
    docs = make_docs(files[1])
    adapter.task_dict = {TASK: {SPLIT: docs}}
    engine = adapter.engine
    engine_requests = [Request([{"role": "user", "content": expected_user_turn(d)}], d["images"]) for d in docs]
    raw = engine.generate(engine_requests, max_new_tokens=6, batch_size=1)
    assert len(set(raw)) >= 4 and all(len(a) >= 4 for a in raw)  # the images and texts steer the answers
    cut = raw[2][1:3]  # an `until` string that occurs inside an answer
    greedy = {"max_new_tokens": 6, "temperature": 0, "until": [cut], "do_sample": False, "image_aspect_ratio": "pad"}
    shorter = {"max_new_tokens": 3, "top_p": 0.5, "num_beams": 1}
    kwargs_of = [greedy if doc_id % 3 else shorter for doc_id in range(len(docs))]  # two groups, interleaved
    requests = [instance("generate_until", (d["question"], dict(kwargs_of[i]), doc_to_visual, i, TASK, SPLIT), i)
                for i, d in enumerate(docs)]
    answers = adapter.generate_until(requests)

    short = engine.generate(engine_requests, max_new_tokens=3, batch_size=1)
    expected = [raw[i].split(cut, 1)[0].strip() if kwargs_of[i] is greedy else short[i] for i in range(len(docs))]
    assert answers == expected
    assert answers[2] != raw[2] and answers[0] == short[0] != raw[0]
    assert [r.args[1] for r in requests] == kwargs_of  # the tasks' gen_kwargs are left as they were


def test_errors_name_the_document(adapter, files):
    adapter.task_dict = {TASK: {SPLIT: [{"images": ["clip.mp4"]}, {"images": [files[1][0]]}]}}
    with pytest.raises(ValueError, match="task 'toy' doc 0: doc_to_visual gave a str; mm_moslora answers from images"):
        adapter.generate_until([instance("generate_until", ("Q?", {}, doc_to_visual, 0, TASK, SPLIT), 0)])
    with pytest.raises(ValueError, match="doc 1: the context has 2 <image> placeholders but doc_to_visual gave 1"):
        adapter.generate_until([instance("generate_until", ("<image> vs <image>?", {}, doc_to_visual, 1, TASK, SPLIT), 1)])


def test_generation_settings():
    assert generation_settings({}) == ({"max_new_tokens": 1024, "temperature": 0.0, "top_p": 1.0}, [])
    assert generation_settings({"temperature": 0.7, "do_sample": False, "until": "\n"})[0]["temperature"] == 0.0
    assert generation_settings({"temperature": 0.7, "top_p": 0.9, "until": "\n"}) == (
        {"max_new_tokens": 1024, "temperature": 0.7, "top_p": 0.9}, ["\n"])
    assert generation_settings({"do_sample": True})[0]["temperature"] == 1.0
    assert generation_settings({"until": ["", "ASSISTANT:"], "max_new_tokens": 16})[1] == ["ASSISTANT:"]
    with pytest.raises(NotImplementedError, match="beam"):
        generation_settings({"num_beams": 4})
    with pytest.raises(ValueError, match="until"):
        generation_settings({"until": 5})


def test_multi_round_follows_doc_to_text(adapter, files):
    images = files[1]
    adapter.task_dict = {TASK: {SPLIT: [{"images": [images[2]]}]}}
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((list(previous_output), round_idx, previous_round_info))
        if round_idx == 1:
            return [images[0], images[1]], "Which one is brighter?", False, previous_output, {"round": 1}
        return None, None, True, previous_output, None

    gen_kwargs = {"max_new_tokens": 5, "temperature": 0}
    request = instance("generate_until_multi_round",
                       ("Describe it.", gen_kwargs, doc_to_visual, doc_to_text, 0, TASK, SPLIT), 0)
    replies = adapter.generate_until_multi_round([request])[0]
    expected = adapter.engine.generate(
        [Request([{"role": "user", "content": "<image>\nDescribe it."}], [images[2]]),
         Request([{"role": "user", "content": "<image> <image>\nWhich one is brighter?"}], images[:2])],
        max_new_tokens=5)
    assert replies == expected
    assert calls == [(expected[:1], 1, None), (expected, 2, {"round": 1})]


def reference_loglikelihood(engine, question: str, images: list, continuation: str) -> tuple[float, bool]:
    """The training path: tokenize_conversation's labels mark the reply + its end of turn; one unpadded row."""
    input_ids, labels = tokenize_conversation([{"from": "human", "value": question},
                                               {"from": "gpt", "value": continuation}],
                                              engine.tokenizer, engine.conv_mode, engine.model.num_image_tokens)
    positions = (labels != IGNORE_INDEX).nonzero().flatten()
    # The reply without its end of turn: "</s>" (vicuna_v1) or "\n" (plain), one token here.
    assert engine.tokenizer.decode(input_ids[positions[-1:]]) == engine.stop_texts[0]
    positions = positions[:-1]
    pixels = torch.stack([engine.image_processor(img) for img in images]) if images else None
    with torch.no_grad():
        logits = engine.model(input_ids[None], torch.ones_like(input_ids)[None], pixels).logits[0]
    logprobs = logits.float().log_softmax(-1)[positions - 1]
    targets = input_ids[positions]
    return float(logprobs.gather(-1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def test_loglikelihood_matches_training_path(adapter, files):
    engine, images = adapter.engine, files[1]
    docs = make_docs(images)
    adapter.task_dict = {TASK: {SPLIT: docs}}
    greedy = engine.generate([Request([{"role": "user", "content": expected_user_turn(d)}], d["images"])
                              for d in docs], max_new_tokens=3)
    # Multiple-choice style requests (lm-eval's " " target delimiter in front), one doc_to_target-style
    # callable, a text-only document; batches of 3 mix lengths and image counts.
    cases = [(0, " " + greedy[0]), (0, " blue"), (1, " " + greedy[1]), (1, " a red square"), (3, " " + greedy[3]),
             (5, " yes"), (4, lambda doc: " " + greedy[4])]
    requests = [instance("loglikelihood", (docs[i]["question"], target, doc_to_visual, i, TASK, SPLIT), i)
                for i, target in cases]
    results = adapter.loglikelihood(requests)
    for (doc_id, target), (logprob, is_greedy) in zip(cases, results):
        doc = docs[doc_id]
        continuation = target(doc) if callable(target) else target
        ref_logprob, ref_greedy = reference_loglikelihood(engine, expected_user_turn(doc), doc["images"],
                                                          continuation.lstrip())
        assert logprob == pytest.approx(ref_logprob, abs=1e-3) and logprob < 0
        assert is_greedy == ref_greedy
    assert len({round(logprob, 3) for logprob, _ in results}) == len(cases)


def test_loglikelihood_of_a_uniform_model(files):
    """With the final norm zeroed every logit is 0: each continuation token costs log(vocab), and greedy
    decoding picks id 0 (<unk>) everywhere. The plain template puts the reply right after the images."""
    adapter = MMMoSLoRA(pretrained=str(files[0]), device="cpu", dtype="fp32", batch_size=2, conv_mode="plain")
    llm = adapter.engine.model.llm
    with torch.no_grad():
        llm.get_decoder().norm.weight.zero_()
    token_cost = math.log(llm.get_output_embeddings().out_features)
    docs = make_docs(files[1])
    adapter.task_dict = {TASK: {SPLIT: docs}}
    n_blue = len(adapter.engine.tokenizer.encode("blue", add_special_tokens=False))
    cases = [(0, "<unk><unk><unk>", 3, True), (0, " blue", n_blue, False), (3, "<unk>", 1, True),
             (5, " <unk><unk>", 2, True), (1, "", 0, True)]
    requests = [instance("loglikelihood", ("Q?", target, doc_to_visual, i, TASK, SPLIT), i) for i, target, _, _ in cases]
    results = adapter.loglikelihood(requests)
    assert [greedy for _, greedy in results] == [greedy for *_, greedy in cases]
    assert [logprob for logprob, _ in results] == pytest.approx([-n * token_cost for _, _, n, _ in cases], abs=1e-4)


def test_model_args_and_cli_defaults(files):
    """--model_args win over the CLI's --batch_size (always passed, default 1); batch_size=auto is refused."""
    adapter = MMMoSLoRA.create_from_arg_string(f"pretrained={files[0]},device=cpu,dtype=fp32,batch_size=5",
                                               {"batch_size": 1, "max_batch_size": None, "device": None})
    assert adapter.batch_size == 5 and adapter.device == torch.device("cpu") and adapter.rank == 0
    with pytest.raises(ValueError, match="auto"):
        MMMoSLoRA.create_from_arg_string(f"pretrained={files[0]}", {"batch_size": "auto", "device": "cpu"})


def test_manifest_resolves_to_the_adapter():
    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_manifest())
    assert registry.get_model_class(LMMS_EVAL_MODEL_NAME) is MMMoSLoRA  # checks the lmms subclass and is_simple


def test_installed_entry_point_registers_the_name():
    """`--model mm_moslora` works once mm_moslora is installed: its entry point is declared in pyproject.toml,
    and lmms-eval's registry (built when lmms_eval.models was first imported) resolves the name."""
    points = importlib.metadata.entry_points(group="lmms_eval.models")
    assert [p.value for p in points if p.name == LMMS_EVAL_MODEL_NAME] == ["mm_moslora.integrations:lmms_eval_manifest"]
    assert LMMS_EVAL_MODEL_NAME in lmms_eval.models.list_available_models()
    assert lmms_eval.models.get_model(LMMS_EVAL_MODEL_NAME) is MMMoSLoRA
