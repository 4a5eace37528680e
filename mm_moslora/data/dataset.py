"""LLaVA-format instruction data: loading, a full validation report, and a lazily tokenized dataset.

Record format (JSON list or JSONL): {"id", "image"?: str | [str], "conversations": [{"from": "human"|"gpt",
"value"}]}; `<image>` marks where each image goes (added before the first human turn when missing).
Records are stored in a `datasets.Dataset` (Arrow) and tokenized only when a sample is drawn.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ..errors import InputError
from .conversation import (IGNORE_INDEX, IMAGE_PLACEHOLDER, ConversationError, render, to_messages,
                           tokenize_conversation)
from .images import ImageProcessor, load_image, resolve_image_path

log = logging.getLogger(__name__)


class DataValidationError(InputError):
    """The data file has problems; the message lists every one with its record index and id."""


@dataclass
class Problem:
    index: int
    record_id: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index} (id {self.record_id}): {self.message}"


@dataclass
class ValidationReport:
    path: str
    n_records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_indices(self) -> set[int]:
        return {p.index for p in self.problems}

    def format(self, limit: int = 50) -> str:
        lines = [f"{self.path}: {len(self.bad_indices)} of {self.n_records} records have problems"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def read_raw_records(data_path: str | Path) -> tuple[list, list[Problem]]:
    """Parse a JSON list or JSONL file. JSONL lines that are not valid JSON become problems (with
    their line number) and a None placeholder, so record indices count every non-blank line."""
    path = Path(data_path)
    if not path.exists():
        raise FileNotFoundError(f"--data_path {data_path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{data_path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}")
        # A null entry would otherwise pass for an already-reported line and vanish silently.
        return records, [Problem(i, "<no id>", "record is null") for i, r in enumerate(records) if r is None]
    records, problems = [], []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            problems.append(Problem(len(records), f"<line {i + 1}>", f"invalid JSON: {err.msg}"))
            records.append(None)
    return records, problems


def image_list(record: dict) -> list[str]:
    """The record's image paths: "image" may be absent, one path, or a list of paths."""
    image = record.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ConversationError(f"'image' must be a path or a list of paths, got {image!r}")
    return images


def normalized_conversations(record: dict) -> list[dict]:
    """Conversations with the `<image>` placeholders LLaVA implies: when a record has images but no
    placeholder, one per image is put at the start of the first human turn."""
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        raise ConversationError("'conversations' must be a list of {\"from\", \"value\"} objects")
    turns = [dict(t) for t in conversations]
    n_images = len(image_list(record))
    if n_images and not any(IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in turns):
        first_human = next((t for t in turns if t.get("from") in ("human", "user")), None)
        if first_human is not None and isinstance(first_human.get("value"), str):
            first_human["value"] = (IMAGE_PLACEHOLDER + "\n") * n_images + first_human["value"]
    return turns


def validate_records(records: list, path: str, tokenizer: PreTrainedTokenizerBase, template: str,
                     num_image_tokens: int, image_folder: str | None, max_length: int,
                     check_images: bool = True) -> ValidationReport:
    """Check every record; collect every problem (not only the first)."""
    report = ValidationReport(str(path), len(records))
    for index, record in enumerate(records):
        if record is None:
            continue  # already reported by read_raw_records (invalid JSON line, null entry)
        rid = str(record.get("id", "<no id>")) if isinstance(record, dict) else "<no id>"
        add = lambda msg: report.problems.append(Problem(index, rid, msg))  # noqa: E731
        if not isinstance(record, dict):
            add("record is not a JSON object")
            continue
        if "conversations" not in record:
            add("missing 'conversations'")
            continue
        try:
            images = image_list(record)
            turns = normalized_conversations(record)
            messages = to_messages(turns)
            if template != "chat_template":  # string work only: catches template rules (plain: one exchange)
                render(messages, tokenizer, template)
        except ConversationError as err:
            add(str(err))
            continue
        n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if n_placeholders > len(images):
            add(f"{n_placeholders} <image> placeholders but {len(images)} images")
            continue
        if n_placeholders < len(images):
            add(f"{len(images)} images but only {n_placeholders} <image> placeholders")
            continue
        bad_image = False
        for image in images:
            try:
                full = resolve_image_path(image, image_folder)
            except ValueError as err:
                add(str(err))
                bad_image = True
                continue
            if check_images and not full.is_file():
                add(f"image {image!r} not found under --image_folder {image_folder!r}")
                bad_image = True
        if bad_image:
            continue
        # Only conversations that could be longer than max_length are tokenized here, so validating a
        # 665K-record file stays fast. Bound: a token covers at least one UTF-8 byte (byte-level BPE and
        # byte fallback), plus generous room for the template's markup and system prompt.
        n_bytes = sum(len(t["value"].encode("utf-8")) for t in turns) + 64 * len(turns) + 512
        if n_bytes + len(images) * num_image_tokens > max_length:
            try:
                _, labels = tokenize_conversation(turns, tokenizer, template, num_image_tokens, max_length)
            except ConversationError as err:
                add(str(err))
                continue
            if not bool((labels != IGNORE_INDEX).any()):
                add(f"every label is masked after truncation to --model_max_length {max_length}")
    return report


def load_llava_data(data_path: str, tokenizer: PreTrainedTokenizerBase, template: str, num_image_tokens: int,
                    image_folder: str | None, max_length: int, skip_bad_samples: bool = False,
                    ) -> tuple[datasets.Dataset, ValidationReport]:
    """Read + validate; returns an Arrow-backed dataset of the good records (id, images, conversations as JSON).

    Raises DataValidationError listing every problem unless `skip_bad_samples`.
    """
    records, problems = read_raw_records(data_path)
    report = validate_records(records, data_path, tokenizer, template, num_image_tokens, image_folder, max_length)
    report.problems = sorted(problems + report.problems, key=lambda p: p.index)
    if report.problems and not skip_bad_samples:
        raise DataValidationError(report.format() + "\nFix these records or pass --skip_bad_samples to train on the rest.")
    bad = report.bad_indices
    rows = [{"id": str(r.get("id", i)), "images": image_list(r),
             "conversations": json.dumps(normalized_conversations(r))}
            for i, r in enumerate(records) if i not in bad and r is not None]
    if bad:
        log.warning("%s: skipping %d bad records of %d (--skip_bad_samples)", data_path, len(bad), len(records))
    if not rows:
        raise DataValidationError(f"{data_path}: no usable records")
    features = datasets.Features({"id": datasets.Value("string"), "images": datasets.Sequence(datasets.Value("string")),
                                  "conversations": datasets.Value("string")})
    return datasets.Dataset.from_list(rows, features=features), report


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenizes on access. Item: {"input_ids": (T,), "labels": (T,), "pixel_values": (n_img, 3, S, S) | None}.
    An image that fails to decode yields None (the collator drops and counts it)."""

    def __init__(self, records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, template: str,
                 num_image_tokens: int, image_processor: ImageProcessor, image_folder: str | None, max_length: int):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.num_image_tokens, self.image_processor = num_image_tokens, image_processor
        self.image_folder, self.max_length = image_folder, max_length

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """LLaVA's modality_lengths: estimated length, positive for image samples, negative for text-only."""
        out = []
        for images, conv in zip(self.records["images"], self.records["conversations"]):
            n = len(conv.split()) + len(images) * self.num_image_tokens
            out.append(n if images else -n)
        return out

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        input_ids, labels = tokenize_conversation(json.loads(record["conversations"]), self.tokenizer, self.template,
                                                  self.num_image_tokens, self.max_length)
        pixel_values = None
        if record["images"]:
            try:
                pixel_values = torch.stack([
                    self.image_processor(load_image(resolve_image_path(p, self.image_folder)))
                    for p in record["images"]])
            except Exception as err:  # noqa: BLE001 - any decode failure: skip the sample, keep training
                log.warning("skipping record %s: image failed to load (%s)", record["id"], err)
                return None
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "id": record["id"]}
