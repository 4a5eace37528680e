"""LLaVA-format data (mm_moslora.data.dataset/sources/images/collate): the validation report, the lazily
tokenized dataset, image preprocessing and the epoch order. Files are written under tmp_path; the tokenizer is
the shipped tiny one. Other formats, mixtures and packing: tests/test_data_formats.py, tests/test_packing.py."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from PIL import Image

from mm_moslora.data.collate import collate, epoch_batches
from mm_moslora.data.conversation import IGNORE_INDEX
from mm_moslora.data.dataset import DataValidationError, InstructionDataset
from mm_moslora.data.formats import to_sample
from mm_moslora.data.images import ImageProcessor, load_image, resolve_image_path
from mm_moslora.data.mixture import load_mixture, single_source
from mm_moslora.data.sources import open_source
from mm_moslora.model.build import build_tokenizer
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID

N_IMG = 4  # image tokens per image
MAX_LEN = 48
TEMPLATE = "chat_template"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


def qa(question: str = "What is it?", answer: str = "A circle.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD = ["ok-img", "ok-text", "ok-auto", "corrupt", "ok-system"]
# One line per record; None marks the line that is not valid JSON. Expected problems by record index.
RECORDS = [
    {"id": "ok-img", "image": "good.png", "conversations": qa("<image>\nWhat is it?")},
    None,
    {"id": "no-conv", "image": "good.png"},
    {"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    {"id": "order", "conversations": list(reversed(qa()))},
    {"id": "empty", "conversations": qa(answer="   ")},
    {"id": "missing-img", "image": "nope.png", "conversations": qa("<image>\nWhat?")},
    {"id": "escape", "image": "../outside.png", "conversations": qa("<image>\nWhat?")},
    {"id": "two-ph", "image": "good.png", "conversations": qa("<image> and <image>: same?")},
    {"id": "masked", "conversations": qa("describe the shapes " * 20, "ok")},
    {"id": "ok-text", "conversations": qa("How many sides has a square?", "Four.")},
    {"id": "ok-auto", "image": "good.png", "conversations": qa("Describe it.")},  # placeholder implied
    {"id": "corrupt", "image": "corrupt.png", "conversations": qa("<image>\nWhat?")},  # found, undecodable
    {"id": "few-ph", "image": ["good.png", "good.png"], "conversations": qa("<image>\nWhat?")},
    {"id": "late-image", "image": "good.png", "conversations": qa("look " * 40 + "<image>")},
    {"id": "img-type", "image": 5, "conversations": qa()},
    [1, 2],
    {"id": "ok-system", "image": "good.png",
     "conversations": [{"from": "system", "value": "Be brief."}] + qa("What colour?", "Red.")},
    {"id": "not-last", "conversations": qa() + [{"from": "human", "value": "and?"}]},
]
EXPECTED = {
    1: ("<line 2>", "invalid JSON"),
    2: ("no-conv", "missing 'conversations'"),
    3: ("bad-role", "turn 0: unknown role 'robot'"),
    4: ("order", "turns out of order: turn 0"),
    5: ("empty", "turn 1: empty assistant reply"),
    6: ("missing-img", "image 'nope.png' not found under --image_folder"),
    7: ("escape", "image path '../outside.png' leaves --image_folder"),
    8: ("two-ph", "2 <image> placeholders but 1 images"),
    9: ("masked", f"every label is masked after truncation to --model_max_length {MAX_LEN}"),
    13: ("few-ph", "2 images but only 1 <image> placeholders"),
    14: ("late-image", f"--model_max_length {MAX_LEN} cuts off image tokens"),
    15: ("img-type", "'image' must be a path or a list of paths"),
    16: ("<no id>", "record is not a JSON object"),
    18: ("not-last", "the conversation must end with an assistant"),
}


def write_images(folder):
    """good.png; corrupt.png (a PNG cut short: its header reads, its pixels do not); outside.png beside the folder."""
    folder.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "good.png")
    Image.effect_noise((64, 64), 50).convert("RGB").save(folder / "corrupt.png")
    (folder / "corrupt.png").write_bytes((folder / "corrupt.png").read_bytes()[:200])
    Image.new("RGB", (8, 8)).save(folder.parent / "outside.png")  # exists, but outside the folder


@pytest.fixture
def data(tmp_path):
    """(data_path, image_folder) with every record of RECORDS, as JSONL."""
    images = tmp_path / "images"
    write_images(images)
    lines = [json.dumps(r) if r is not None else '{"id": "broken", "conversations": [' for r in RECORDS]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, images


def load(path, images, tokenizer, skip_bad_samples=False, template=TEMPLATE, max_length=MAX_LEN, exact=False):
    """The validated data of one file: (mixture, its report)."""
    mixture = load_mixture(single_source(str(path), str(images)), tokenizer, template, N_IMG, max_length,
                           skip_bad_samples, seed=0, exact_lengths=exact, progress=False)
    return mixture, mixture.reports[0]


def ids_of(mixture) -> list[str]:
    part = mixture.parts[0]
    return [part.source.record(int(r))["id"] for r in mixture.rows]


def samples_of(mixture):
    part = mixture.parts[0]
    return [to_sample(part.source.record(int(r)), part.source.format) for r in mixture.rows]


def test_every_problem_is_reported_with_index_and_id(data, tokenizer):
    path, images = data
    with pytest.raises(DataValidationError) as info:
        load(path, images, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}: {len(EXPECTED)} of {len(RECORDS)} records have problems")
    for index, (record_id, problem) in EXPECTED.items():
        assert f"record {index} (id {record_id}): {problem}" in message, (index, problem)
    assert "--skip_bad_samples" in message
    for record_id in GOOD:
        assert f"(id {record_id})" not in message


def test_skip_bad_samples_keeps_the_rest(data, tokenizer):
    path, images = data
    mixture, report = load(path, images, tokenizer, skip_bad_samples=True)
    assert report.bad_indices == set(EXPECTED) and report.n_records == len(RECORDS)
    assert [p.index for p in report.problems] == sorted(p.index for p in report.problems)
    assert ids_of(mixture) == GOOD and mixture.n_bad == len(EXPECTED)
    samples = samples_of(mixture)
    assert [s.images for s in samples] == [["good.png"], [], ["good.png"], ["corrupt.png"], ["good.png"]]
    assert samples[2].turns[0]["value"] == "<image>\nDescribe it."
    assert samples[4].turns[0]["value"] == "Be brief." and samples[4].turns[1]["value"] == "<image>\nWhat colour?"


def test_json_list_file_and_null_entries(tmp_path, tokenizer):
    images = tmp_path / "images"
    write_images(images)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORDS[0], None, RECORDS[10]], indent=1))
    with pytest.raises(DataValidationError, match=r"record 1 \(id <no id>\): record is null"):
        load(path, images, tokenizer)
    mixture, _ = load(path, images, tokenizer, skip_bad_samples=True)
    assert ids_of(mixture) == ["ok-img", "ok-text"]
    (tmp_path / "broken.json").write_text('[{"id": 1},\n {"id": ')
    with pytest.raises(DataValidationError, match="invalid JSON at line 2"):
        open_source(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "absent.jsonl")
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(RECORDS[2]) + "\n")
    with pytest.raises(DataValidationError, match="no usable records"):
        load(only_bad, images, tokenizer, skip_bad_samples=True)


def test_a_null_line_in_a_jsonl_file_is_a_bad_record(tmp_path, tokenizer):
    """Issue 14: a `null` line was dropped and counted nowhere."""
    images = tmp_path / "images"
    write_images(images)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(RECORDS[0]), "null", json.dumps(RECORDS[10])]) + "\n")
    with pytest.raises(DataValidationError, match=r"1 of 3 records have problems\n  record 1 \(id <no id>\): record is null"):
        load(path, images, tokenizer)
    mixture, report = load(path, images, tokenizer, skip_bad_samples=True)
    assert ids_of(mixture) == ["ok-img", "ok-text"] and report.bad_indices == {1} and mixture.n_bad == 1


FOURTEEN_BAD = [  # (id, record or None for a `null` line, what the report says)
    ("<no id>", None, "record is null"),
    ("not-image", {"image": "text.png"}, "image 'text.png' is not a readable image"),
    ("zero-byte", {"image": "empty.png"}, "image 'empty.png' is not a readable image"),
    ("garbage", {"image": "garbage.png"}, "image 'garbage.png' is not a readable image"),
    ("role-list", {"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "turn 0: unknown role ['human']"),
    ("folder", {"image": "sub"}, "image 'sub' is not a regular file"),
    ("no-conv", {"conversations": None}, "missing 'conversations'"),
    ("bad-role", {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "turn 0: unknown role 'robot'"),
    ("order", {"conversations": list(reversed(qa("hi")))}, "turns out of order"),
    ("empty-reply", {"conversations": qa("<image>\nhi", "  ")}, "turn 1: empty assistant reply"),
    ("missing", {"image": "nope.png"}, "image 'nope.png' not found"),
    ("two-ph", {"conversations": qa("<image> <image>")}, "2 <image> placeholders but 1 images"),
    ("<no id>", [1, 2], "record is not a JSON object"),
    ("value-type", {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "turn 0: 'value' must be a string"),
]


def test_validation_finds_every_bad_record_of_a_file(tmp_path, tokenizer):
    """Issue 14: the report found 10 of these 14 (unreadable images, a null line) or stopped with a traceback."""
    images = tmp_path / "images"
    write_images(images)
    (images / "sub").mkdir()
    (images / "text.png").write_text("hello, not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"nonsense" * 8)
    good = {"image": "good.png", "conversations": qa("<image>\nWhat is it?")}
    lines = []
    for i, (record_id, change, _) in enumerate(FOURTEEN_BAD):
        lines.append(json.dumps({"id": f"good-{i}", **good}))
        if change is None or isinstance(change, list):
            lines.append(json.dumps(change))
        else:
            record = {"id": record_id, **good, **change}
            lines.append(json.dumps({k: v for k, v in record.items() if v is not None}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as info:
        load(path, images, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}: 14 of 28 records have problems")
    for i, (record_id, _, problem) in enumerate(FOURTEEN_BAD):
        assert f"record {2 * i + 1} (id {record_id}): {problem}" in message, (record_id, message)
    assert "good-" not in message


def test_a_file_holding_one_json_object_is_one_clear_error(tmp_path, tokenizer):
    """Issue 14: a top-level object over 32 lines gave 32 "invalid JSON" lines."""
    images = tmp_path / "images"
    write_images(images)
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": 1, "data": [RECORDS[0], RECORDS[10]]}, indent=2))
    assert len(path.read_text().splitlines()) > 20
    for skip in (False, True):
        with pytest.raises(DataValidationError) as info:
            load(path, images, tokenizer, skip_bad_samples=skip)
        assert str(info.value) == (f"{path}: the file holds one JSON object, not a list of records (a JSON list, or "
                                   "one object per line); its key 'data' holds a list of 2 objects: save that list "
                                   "as the file")
    path.write_text(json.dumps(RECORDS[0]))  # one record on one line: a JSONL file of one record
    assert ids_of(load(path, images, tokenizer)[0]) == ["ok-img"]


def test_template_rules_are_validated_even_for_short_records(tmp_path, tokenizer):
    images = tmp_path / "images"
    write_images(images)
    path = tmp_path / "captions.jsonl"
    records = [{"id": "cap", "image": "good.png", "conversations": qa("<image>\nDescribe.", "A red square.")},
               {"id": "multi", "image": "good.png", "conversations": qa("<image>\nDescribe.") + qa("More?", "No.")}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DataValidationError) as info:
        load(path, images, tokenizer, template="plain", max_length=2048)
    assert "record 1 (id multi): the plain template takes one human turn and one gpt reply" in str(info.value)
    assert "(id cap)" not in str(info.value)


def test_images_without_placeholders_go_before_the_first_human_turn():
    record = {"image": ["a.png", "b.png"], "conversations": qa("Compare.")}
    assert to_sample(record, "llava").turns[0]["value"] == "<image>\n<image>\nCompare."
    assert record["conversations"][0]["value"] == "Compare."  # the record itself is not modified


def test_dataset_items_and_collate_drop_undecodable_images(data, tokenizer, caplog):
    path, images = data
    estimated = load(path, images, tokenizer, skip_bad_samples=True)[0]
    mixture, _ = load(path, images, tokenizer, skip_bad_samples=True, exact=True)  # as --packing validates
    assert estimated.reports[0].problems == mixture.reports[0].problems
    processor = ImageProcessor(64, CLIP_MEAN, CLIP_STD, "pad")
    dataset = InstructionDataset(mixture.parts, mixture.source_ids, mixture.rows, mixture.lengths, tokenizer,
                                 TEMPLATE, N_IMG, processor, MAX_LEN)
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    # The warning names the source, the row and the id of the sample it skips.
    assert f"skipping {path} record 12 (id corrupt): an image failed to decode" in caplog.text
    assert items[GOOD.index("corrupt")] is None
    image_item, text_item = items[0], items[1]
    assert image_item["pixel_values"].shape == (1, 3, 64, 64) and text_item["pixel_values"] is None
    assert (image_item["input_ids"] == IMAGE_TOKEN_ID).sum() == N_IMG
    assert image_item["input_ids"].shape == image_item["labels"].shape and len(image_item["input_ids"]) <= MAX_LEN
    lengths = dataset.lengths()  # LLaVA's modality lengths, exact: + for image samples, - for text-only
    assert lengths[0] == len(image_item["input_ids"]) and lengths[1] == -len(text_item["input_ids"])
    assert [n > 0 for n in lengths] == [True, False, True, True, True]
    assert [abs(n) for i, n in enumerate(lengths) if items[i] is not None] == \
        [len(item["input_ids"]) for item in items if item is not None]
    words = [sum(len(t["value"].split()) for t in s.turns) + N_IMG * len(s.images) for s in samples_of(estimated)]
    assert estimated.lengths.tolist() == [n if n_img > 0 else -n for n, n_img in  # LLaVA's estimate otherwise
                                          zip(words, [len(s.images) for s in samples_of(estimated)])]

    batch = collate(items, pad_token_id=tokenizer.pad_token_id)
    assert batch["n_skipped"] == 1
    good = [item for item in items if item is not None]
    length = max(len(item["input_ids"]) for item in good)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, length)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    # Every image in the batch has its positions, in order: the model can scatter the features.
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * N_IMG
    for row, item in enumerate(good):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
    assert collate([None, None], 0) == {"n_skipped": 2}
    text_batch = collate([text_item], tokenizer.pad_token_id)
    assert text_batch["pixel_values"] is None and text_batch["n_skipped"] == 0


def test_load_image_rejects_corrupt_and_truncated_files(tmp_path):
    path = tmp_path / "big.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert load_image(path).size == (64, 64)
    with pytest.raises(Exception):
        load_image(truncated)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(Exception):
        load_image(tmp_path / "text.png")


# ---------------------------------------------------------------------------------------------------
# Image preprocessing and paths

def normalised(colour: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)])


RED = (200, 30, 30)


@pytest.mark.parametrize("size", [(60, 20), (20, 60)])
def test_pad_mode_pads_with_the_mean_colour(size):
    processor = ImageProcessor(64, CLIP_MEAN, CLIP_STD, "pad")
    out = processor(Image.new("RGB", size, RED))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    mean_colour = tuple(int(255 * m) for m in CLIP_MEAN)  # LLaVA's fill: the mean, as 8-bit values
    torch.testing.assert_close(out[:, 0, 0], normalised(mean_colour), atol=0.02, rtol=0)
    torch.testing.assert_close(out[:, 63, 63], normalised(mean_colour), atol=0.02, rtol=0)
    torch.testing.assert_close(out[:, 32, 32], normalised(RED), atol=0.02, rtol=0)


@pytest.mark.parametrize("mode", ["square", "resize"])
def test_crop_and_resize_modes_keep_only_the_image(mode):
    out = ImageProcessor(64, CLIP_MEAN, CLIP_STD, mode)(Image.new("RGB", (60, 20), RED))
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out, normalised(RED)[:, None, None].expand(3, 64, 64), atol=0.02, rtol=0)


def test_normalisation_and_grayscale_input():
    processor = ImageProcessor(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "pad")
    out = processor(Image.new("L", (32, 32), 255))  # converted to RGB
    torch.testing.assert_close(out, torch.full((3, 32, 32), 2.0))
    with pytest.raises(ValueError, match="--image_aspect_ratio"):
        ImageProcessor(32, CLIP_MEAN, CLIP_STD, "stretch")


def test_resolve_image_path(tmp_path):
    folder = tmp_path / "data"
    (folder / "coco").mkdir(parents=True)
    assert resolve_image_path("coco/a.jpg", folder) == folder / "coco" / "a.jpg"
    assert resolve_image_path("coco/../b.jpg", str(folder)) == folder / "b.jpg"
    with pytest.raises(ValueError, match="leaves --image_folder"):
        resolve_image_path("../secret.jpg", folder)
    with pytest.raises(ValueError, match="leaves --image_folder"):
        resolve_image_path("coco/../../secret.jpg", folder)
    # Absolute paths and symlinks out of the folder are refused unless allowed (docs/bad_input.md).
    with pytest.raises(ValueError, match="is absolute"):
        resolve_image_path("/abs/x.jpg", folder)
    assert resolve_image_path("/abs/x.jpg", folder, allow_outside=True) == type(folder)("/abs/x.jpg")
    real = tmp_path / "storage" / "gqa"
    real.mkdir(parents=True)
    os.symlink(real, folder / "gqa")
    with pytest.raises(ValueError, match="symlink out of"):
        resolve_image_path("gqa/x.jpg", folder)
    assert resolve_image_path("gqa/x.jpg", folder, allow_outside=True) == folder / "gqa" / "x.jpg"
    # The folder itself may be a symlink to where the images really are.
    assert resolve_image_path("x.jpg", folder / "gqa") == real / "x.jpg"


# ---------------------------------------------------------------------------------------------------
# Epoch order

LENGTHS = [10 + i for i in range(23)] + [-(5 + i) for i in range(17)]  # 23 image, 17 text-only samples


@pytest.mark.parametrize("grouped", [True, False])
def test_epoch_batches_shapes_and_no_repeats(grouped):
    batch_size, world_size = 2, 3
    steps = epoch_batches(LENGTHS, batch_size, world_size, seed=3, epoch=0, group_by_modality_length=grouped)
    expected_steps = (23 // 6 + 17 // 6) if grouped else 40 // 6
    assert len(steps) == expected_steps
    seen = []
    for step in steps:
        assert len(step) == world_size and all(len(rank) == batch_size for rank in step)
        seen += [i for rank in step for i in rank]
    assert len(seen) == len(set(seen)) == expected_steps * batch_size * world_size
    assert set(seen) <= set(range(len(LENGTHS)))


def test_epoch_batches_modality_purity_and_mix():
    steps = epoch_batches(LENGTHS, 2, 3, seed=0, epoch=1)
    kinds = [{LENGTHS[i] > 0 for rank in step for i in rank} for step in steps]
    assert all(len(k) == 1 for k in kinds)  # each global batch: only image or only text samples
    assert {True} in kinds and {False} in kinds
    # Ranks get a similar length mix: the longest samples of a global batch go to different ranks.
    for step in steps:
        longest = sorted((abs(LENGTHS[i]), r) for r, rank in enumerate(step) for i in rank)[-3:]
        assert len({r for _, r in longest}) == 3


def test_epoch_batches_deterministic_per_seed_and_epoch():
    kwargs = dict(lengths=LENGTHS, batch_size=2, world_size=2)
    assert epoch_batches(**kwargs, seed=1, epoch=0) == epoch_batches(**kwargs, seed=1, epoch=0)
    assert epoch_batches(**kwargs, seed=1, epoch=0) != epoch_batches(**kwargs, seed=1, epoch=1)
    assert epoch_batches(**kwargs, seed=1, epoch=0) != epoch_batches(**kwargs, seed=2, epoch=0)
    # Across epochs every sample is eventually drawn.
    drawn = {i for epoch in range(10) for step in epoch_batches(**kwargs, seed=1, epoch=epoch) for r in step for i in r}
    assert drawn == set(range(len(LENGTHS)))
    assert len(epoch_batches(LENGTHS, 1, 1, seed=0, epoch=0)) == len(LENGTHS)
