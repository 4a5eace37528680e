"""Training data as people have it (mm_moslora.data.formats/sources/mixture): a Parquet file with embedded PNG/JPEG
images (LLaVA-OneVision's layout), ShareGPT JSONL with image paths, OpenAI messages (a save_to_disk dataset with a
`datasets.Image` column, and JSONL with data URIs), the cauldron's layout in a hub-style folder; several images per
turn, a corrupt embedded image and one that fails only when decoded. Each is detected, validated and read with its
images in order; a mixture of all of them trains with packing and resumes exactly."""
from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mm_moslora.data.conversation import IGNORE_INDEX
from mm_moslora.data.dataset import InstructionDataset
from mm_moslora.data.images import ImageProcessor
from mm_moslora.data.mixture import MIXTURE_FILE, load_mixture, mixture_differences, read_mixture, select
from mm_moslora.data.sources import DataValidationError, open_source
from mm_moslora.model.build import build_tokenizer
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID
from tests.test_train import FAST, INFERENCE_FILES, SUMMARY, finetune_cmd, kill_after_first_checkpoint, start

N_IMG, MAX_LEN, TEMPLATE = 4, 512, "chat_template"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30),
           "purple": (130, 40, 170), "grey": (128, 128, 128)}
PROCESSOR = ImageProcessor(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")


def encoded(colour: str, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), COLOURS[colour]).save(buffer, format=kind)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]  # the header reads; the pixels do not


def qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


IMAGE = datasets.Image()
# id -> the colours of its images in reading order (what the dataset must hand the model, in that order).
EXPECTED_IMAGES = {
    "ov-png": ["red"], "ov-jpeg": ["blue"], "ov-text": [], "ov-truncated": None,
    "sg-two": ["green", "yellow"], "sg-system": ["purple"], "sg-text": [], "sg-multiturn": ["red", "grey"],
    "hf-two-in-one-turn": ["green", "blue"], "hf-later-turn": ["red", "yellow", "grey"], "hf-text": [],
    "oa-data-uri": ["purple"], "oa-path": ["yellow"], "oa-string": [],
    "c-0": ["grey"], "c-1": ["green", "red"], "c-2": ["blue"],
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One source per format under a temporary folder; `images/` holds the files that records name by path."""
    root = tmp_path_factory.mktemp("formats")
    images = root / "images"
    images.mkdir()
    for colour in COLOURS:
        (images / f"{colour}.png").write_bytes(encoded(colour))

    # 1. LLaVA records with an embedded `image` column (LLaVA-OneVision's Parquet files).
    onevision = datasets.Dataset.from_dict({
        "id": ["ov-png", "ov-jpeg", "ov-corrupt", "ov-text", "ov-truncated"],
        "image": [{"bytes": encoded("red"), "path": None}, {"bytes": encoded("blue", "JPEG"), "path": None},
                  {"bytes": b"certainly not an image", "path": None}, None,
                  {"bytes": truncated_jpeg(), "path": None}],
        "conversations": [qa("<image>\nWhat colour?", "Red."), qa("What colour is it?", "Blue."),
                          qa("<image>\nAnd this?", "Unknown."), qa("Say hi.", "Hi."),
                          qa("<image>\nNoise?", "Yes.")]},
        features=datasets.Features({"id": datasets.Value("string"), "image": IMAGE,
                                    "conversations": [{"from": datasets.Value("string"),
                                                       "value": datasets.Value("string")}]}))
    onevision.to_parquet(str(root / "onevision.parquet"))

    # 2. ShareGPT (LLaMA-Factory's layout): `images` paths, a `system` prompt, two images in one turn.
    sharegpt = [
        {"id": "sg-two", "images": ["green.png", "yellow.png"],
         "conversations": qa("<image><image>Which is brighter?", "The yellow one.")},
        {"id": "sg-system", "system": "Answer in one word.", "images": ["purple.png"],
         "conversations": qa("<image>Colour?", "Purple.")},
        {"id": "sg-text", "conversations": qa("Two plus two?", "Four.")},
        {"id": "sg-multiturn", "images": ["red.png", "grey.png"],
         "conversations": qa("<image>First?", "Red.") + qa("<image>And now?", "Grey.")},
    ]
    (root / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt) + "\n")

    # 3. OpenAI messages with image parts and an `images` column of embedded images (Hugging Face's layout),
    #    saved with save_to_disk.
    def text(t):
        return {"type": "text", "text": t}
    image_part = {"type": "image", "text": None}
    hf = datasets.Dataset.from_dict({
        "id": ["hf-two-in-one-turn", "hf-later-turn", "hf-text"],
        "images": [[{"bytes": encoded("green"), "path": None}, {"bytes": encoded("blue", "JPEG"), "path": None}],
                   [{"bytes": encoded(c), "path": None} for c in ("red", "yellow", "grey")], []],
        "messages": [
            [{"role": "user", "content": [image_part, image_part, text("Compare them.")]},
             {"role": "assistant", "content": [text("Green, then blue.")]}],
            [{"role": "user", "content": [image_part, text("What is it?")]},
             {"role": "assistant", "content": [text("Red.")]},
             {"role": "user", "content": [text("And these two?"), image_part, image_part]},
             {"role": "assistant", "content": [text("Yellow and grey.")]}],
            [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [text("Hello?")]},
             {"role": "assistant", "content": [text("Hello.")]}]]},
        features=datasets.Features({"id": datasets.Value("string"), "images": datasets.Sequence(IMAGE),
                                    "messages": [{"role": datasets.Value("string"), "content": [
                                        {"type": datasets.Value("string"), "text": datasets.Value("string")}]}]}))
    hf.save_to_disk(str(root / "openai_saved"))

    # 4. OpenAI messages in JSONL: a data URI, a path part, plain string contents.
    data_uri = "data:image/png;base64," + base64.b64encode(encoded("purple")).decode()
    openai = [
        {"id": "oa-data-uri", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}}, text("Colour?")]},
            {"role": "assistant", "content": "Purple."}]},
        {"id": "oa-path", "messages": [
            {"role": "user", "content": [text("What is this?"), {"type": "image", "image": "yellow.png"}]},
            {"role": "assistant", "content": [text("Yellow.")]}]},
        {"id": "oa-string", "messages": [{"role": "user", "content": "Name a colour."},
                                         {"role": "assistant", "content": "Teal."}]},
        {"id": "oa-remote", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
            {"role": "assistant", "content": "?"}]},
    ]
    (root / "openai.jsonl").write_text("\n".join(json.dumps(r) for r in openai) + "\n")

    # 5. The cauldron's records in a local folder laid out like a hub dataset (data/train-*.parquet).
    cauldron = datasets.Dataset.from_dict({
        "images": [[{"bytes": encoded("grey"), "path": None}],
                   [{"bytes": encoded("green"), "path": None}, {"bytes": encoded("red", "JPEG"), "path": None}],
                   [{"bytes": encoded("blue"), "path": None}]],
        "texts": [[{"user": "Colour?", "assistant": "Grey.", "source": "x"}],
                  [{"user": "Left and right?", "assistant": "Green, red.", "source": "x"},
                   {"user": "Sure?", "assistant": "Yes.", "source": "x"}],
                  [{"user": "Colour?", "assistant": "Blue.", "source": "x"}]]},
        features=datasets.Features({"images": datasets.Sequence(IMAGE), "texts": [
            {"user": datasets.Value("string"), "assistant": datasets.Value("string"),
             "source": datasets.Value("string")}]}))
    (root / "cauldron" / "data").mkdir(parents=True)
    cauldron.to_parquet(str(root / "cauldron" / "data" / "train-00000-of-00001.parquet"))

    mixture = root / "mix.yaml"
    mixture.write_text("datasets:\n"
                       "  - path: onevision.parquet\n"
                       "  - path: sharegpt.jsonl\n    format: sharegpt\n"
                       "  - path: openai_saved\n"
                       "  - path: openai.jsonl\n"
                       "  - json_path: cauldron\n    sampling_strategy: all\n")
    return {"root": root, "images": images, "onevision": root / "onevision.parquet",
            "sharegpt": root / "sharegpt.jsonl", "openai_saved": root / "openai_saved",
            "openai": root / "openai.jsonl", "cauldron": root / "cauldron", "mixture": mixture}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


def test_each_source_kind_and_record_format_is_detected(sources, cache):
    expected = {"onevision": ("parquet", "llava", 5), "sharegpt": ("jsonl", "sharegpt", 4),
                "openai_saved": ("arrow", "openai", 3), "openai": ("jsonl", "openai", 4),
                "cauldron": ("hub", "cauldron", 3)}
    for name, (kind, fmt, n) in expected.items():
        source = open_source(sources[name], cache_dir=cache)
        assert (source.kind, source.format, len(source)) == (kind, fmt, n), name
        assert fmt in source.describe()
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(sources["root"] / "absent.parquet")
    (sources["root"] / "notes.txt").write_text("hello")
    with pytest.raises(DataValidationError, match="notes.txt: not a supported data file"):
        open_source(sources["root"] / "notes.txt")
    (sources["root"] / "broken.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DataValidationError, match=r"broken.parquet: cannot be read as a dataset \("):
        open_source(sources["root"] / "broken.parquet", cache_dir=cache)


def colour_of(pixels: torch.Tensor) -> str:
    """The COLOURS name closest to a preprocessed solid image (JPEG shifts colours a little)."""
    mean = (pixels.mean(dim=(1, 2)) * 0.5 + 0.5) * 255
    return min(COLOURS, key=lambda c: float(((mean - torch.tensor(COLOURS[c], dtype=torch.float)) ** 2).sum()))


def test_every_format_gives_its_images_in_order_and_reports_bad_ones(sources, tokenizer, cache, caplog):
    specs = read_mixture(str(sources["mixture"]), str(sources["images"]))
    with pytest.raises(DataValidationError) as info:
        load_mixture(specs, tokenizer, TEMPLATE, N_IMG, MAX_LEN, False, seed=0, cache_dir=cache, progress=False)
    message = str(info.value)  # one report per source with problems, each record named by its source and row
    assert f"{sources['onevision']}: 1 of 5 records have problems\n  record 2 (id ov-corrupt): embedded image " \
           "(22 bytes) is not a readable image" in message
    assert f"{sources['openai']}: 1 of 4 records have problems\n  record 3 (id oa-remote): message 0 part 0 " \
           "'https://x.org/a.png': remote images are not fetched" in message
    assert str(sources["sharegpt"]) not in message and "--skip_bad_samples" in message

    mixture = load_mixture(specs, tokenizer, TEMPLATE, N_IMG, MAX_LEN, True, seed=0, cache_dir=cache,
                           exact_lengths=True, progress=False)
    assert [r["format"] for r in mixture.record["sources"]] == ["llava", "sharegpt", "openai", "openai", "cauldron"]
    assert mixture.n_bad == 2 and len(mixture.rows) == 4 + 4 + 3 + 3 + 3  # the usable records of the 5 sources
    dataset = InstructionDataset(mixture.parts, mixture.source_ids, mixture.rows, mixture.lengths, tokenizer,
                                 TEMPLATE, N_IMG, PROCESSOR, MAX_LEN)
    seen = {}
    with caplog.at_level(logging.WARNING):
        for i in range(len(dataset)):
            item = dataset[i]
            part = mixture.parts[int(mixture.source_ids[i])]
            record = part.source.record(int(mixture.rows[i]))
            record_id = record.get("id") or f"c-{int(mixture.rows[i])}"
            if item is None:
                seen[record_id] = None
                continue
            assert int((item["input_ids"] == IMAGE_TOKEN_ID).sum()) == N_IMG * len(EXPECTED_IMAGES[record_id])
            assert len(item["input_ids"]) == abs(dataset.lengths()[i])
            assert (item["labels"] != IGNORE_INDEX).any()
            seen[record_id] = [] if item["pixel_values"] is None else [colour_of(p) for p in item["pixel_values"]]
    assert seen == EXPECTED_IMAGES
    assert f"skipping {sources['onevision']} record 4 (id ov-truncated): an image failed to decode" in caplog.text


def test_record_problems_of_each_format(tmp_path, tokenizer):
    records = [
        {"id": "ok", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "no-image-left", "messages": [{"role": "user", "content": [{"type": "image"}]},
                                             {"role": "assistant", "content": "x"}]},
        {"id": "part-type", "messages": [{"role": "user", "content": [{"type": "audio"}]},
                                         {"role": "assistant", "content": "x"}]},
        {"id": "spare-images", "images": ["a.png", "b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "x"}]},
        {"id": "tool", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
        {"id": "llava-style", "image": "a.png", "conversations": qa("<image>hi", "x")},
        {"id": "bad-uri", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,@@@"}}]}, {"role": "assistant", "content": "x"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DataValidationError) as info:
        load_mixture(read_mixture_of(tmp_path, path), tokenizer, TEMPLATE, N_IMG, MAX_LEN, False, 0, progress=False)
    message = str(info.value)
    for expected in ("record 1 (id no-image-left): message 0 part 0: an image part without an image, and 'images' "
                     "has only 0",
                     "record 2 (id part-type): message 0 part 0: unknown content part type 'audio'",
                     "record 3 (id spare-images): 'images' has 2 images but the messages use 1",
                     "record 4 (id tool): turn 1: unknown role 'tool'",
                     "record 5 (id llava-style): record is in llava form, but the file is openai",
                     "record 6 (id bad-uri): message 0 part 0: the data URI is not valid base64"):
        assert expected in message
    assert "(id ok)" not in message


def read_mixture_of(folder: Path, *paths: Path):
    mix = folder / "one.yaml"
    mix.write_text("datasets:\n" + "".join(f"  - path: {p}\n" for p in paths))
    return read_mixture(str(mix), str(folder))


def test_mixture_strategies_are_deterministic_per_seed(sources, tokenizer, cache):
    import random

    assert select(10, "all", random.Random(0)).tolist() == list(range(10))
    assert select(10, "first:3", random.Random(0)).tolist() == [0, 1, 2]
    assert select(10, "end:20%", random.Random(0)).tolist() == [8, 9]
    assert len(set(select(10, "random:40%", random.Random(0)).tolist())) == 4
    twice = select(4, "ratio:2.5", random.Random(0)).tolist()
    assert len(twice) == 10 and sorted(set(twice)) == [0, 1, 2, 3] and twice[:8] == [0, 1, 2, 3] * 2
    assert select(3, "samples:7", random.Random(0)).tolist()[:6] == [0, 1, 2, 0, 1, 2]
    assert select(100, "ratio:0.3", random.Random(1)).tolist() == select(100, "ratio:0.3", random.Random(1)).tolist()
    assert select(100, "ratio:0.3", random.Random(1)).tolist() != select(100, "ratio:0.3", random.Random(2)).tolist()

    mix = sources["root"] / "ratios.yaml"
    mix.write_text("datasets:\n  - path: sharegpt.jsonl\n    samples: 10\n  - path: cauldron\n    ratio: 0.67\n")
    specs = read_mixture(str(mix), str(sources["images"]))
    one = load_mixture(specs, tokenizer, TEMPLATE, N_IMG, MAX_LEN, False, seed=3, cache_dir=cache, progress=False)
    again = load_mixture(specs, tokenizer, TEMPLATE, N_IMG, MAX_LEN, False, seed=3, cache_dir=cache, progress=False)
    other = load_mixture(specs, tokenizer, TEMPLATE, N_IMG, MAX_LEN, False, seed=4, cache_dir=cache, progress=False)
    assert [s["taken"] for s in one.record["sources"]] == [10, 2]
    assert one.record == again.record and one.record != other.record
    assert one.record["sources"][0]["rows"][:2] == [[0, 4], [0, 4]]  # every record twice, then two more
    assert one.record["sources"][0]["strategy"] == "samples:10" and one.record["samples"] == 12
    # What a resumed run compares with its checkpoint's data_mixture.json (and refuses to resume on).
    assert mixture_differences(one.record, again.record) == []
    diffs = mixture_differences(one.record, other.record)
    assert diffs[0] == "seed 3 -> 4" and any(d.endswith("rows_sha256 " + one.record["sources"][0]["rows_sha256"] + " -> "
                                                       + other.record["sources"][0]["rows_sha256"]) for d in diffs)
    fewer = {**one.record, "sources": one.record["sources"][:1]}
    assert mixture_differences(one.record, fewer)[0].startswith("sources [")


@pytest.mark.parametrize("text, error", [
    ("datasets: []\n", "expected a top-level `datasets:` list"),
    ("datasets:\n  - path: a.json\n    weight: 2\n", r"datasets\[0\]: unknown keys \['weight'\]"),
    ("datasets:\n  - path: a.json\n    ratio: 0.5\n    samples: 3\n", "give one of ratio, samples"),
    ("datasets:\n  - path: a.json\n    ratio: -1\n", "ratio must be a positive number"),
    ("datasets:\n  - path: a.json\n    samples: 2.5\n", "samples must be a positive whole number"),
    ("datasets:\n  - path: a.json\n    sampling_strategy: half\n", "sampling_strategy 'half': use all"),
    ("datasets:\n  - image_folder: x\n", r"datasets\[0\]: needs a `path`"),
    ("datasets:\n  - path: [a\n", "invalid YAML"),
])
def test_mixture_file_errors_are_one_line(tmp_path, text, error):
    mix = tmp_path / "mix.yaml"
    mix.write_text(text)
    with pytest.raises(DataValidationError, match=error) as info:
        read_mixture(str(mix), None)
    assert "\n" not in str(info.value) and str(mix) in str(info.value)


# ---------------------------------------------------------------- training on the mixture, with packing
def test_a_packed_mixture_of_every_format_trains_and_resumes_exactly(sources, tmp_path, recipe_in_process,
                                                                   monkeypatch):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}  # Parquet is converted to Arrow there
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))  # and in this process
    flags = ["--data_mixture", sources["mixture"], "--image_folder", sources["images"], "--skip_bad_samples",
             "--packing", "True", "--model_max_length", "384", *FAST, "--per_device_train_batch_size", "1",
             "--max_steps", "4", "--save_steps", "2", "--lora_dropout", "0.1"]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    # The killed run is a real process; resuming it and the reference run the script's entry point in this one.
    kill_after_first_checkpoint(start(finetune_cmd(*flags, "--output_dir", resumed_dir), tmp_path, "victim", env),
                                resumed_dir)
    resumed = recipe_in_process("finetune", [*flags, "--output_dir", resumed_dir])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and SUMMARY in resumed.stdout
    reference = recipe_in_process("finetune", [*flags, "--output_dir", reference_dir])
    assert reference.returncode == 0, reference.stderr[-3000:]

    for name in INFERENCE_FILES:
        expected, got = load_file(str(reference_dir / name)), load_file(str(resumed_dir / name))
        assert expected.keys() == got.keys() and expected
        for key in expected:
            assert (expected[key] - got[key]).abs().max() <= 1e-6, f"{name}: {key} differs after resuming"
    summaries = [json.loads((d / "train_summary.json").read_text()) for d in (reference_dir, resumed_dir)]
    for key in ("steps", "samples", "final_loss", "skipped_images", "dropped_records"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[0]["packing"] and summaries[0]["dropped_records"] == 2
    assert summaries[0]["samples"] > 4  # several samples per packed row and step
    # The exact mixture sits beside the checkpoint and the final files, the same in both runs.
    mixture = json.loads((reference_dir / MIXTURE_FILE).read_text())
    assert mixture == json.loads((resumed_dir / MIXTURE_FILE).read_text())
    assert mixture == json.loads((reference_dir / "checkpoints" / "step-4" / MIXTURE_FILE).read_text())
    assert [s["format"] for s in mixture["sources"]] == ["llava", "sharegpt", "openai", "openai", "cauldron"]

