"""Instruction data: a full validation report per source, and a lazily tokenized dataset over one or more sources.

Every record of every source is checked before training (format, roles and order, the template's rules,
`<image>` placeholders against images, each image found and readable as an image, the length against
--model_max_length), and every problem is reported with its source, record index and id. Records are read
from their source (memory-mapped for Arrow data) and tokenized only when drawn; exact token lengths are
(for packing) computed once, in the validation pass.
"""
from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .conversation import (IGNORE_INDEX, IMAGE_PLACEHOLDER, ConversationError, render, to_messages,
                           tokenize_conversation)
from .formats import ImageRef, Sample, to_sample
from .images import MAX_IMAGE_PIXELS, ImageProcessor, load_image, resolve_image_path
from .sources import DataValidationError, Problem, Source

log = logging.getLogger(__name__)

__all__ = ["DataValidationError", "Problem", "ValidationReport", "ValidatedSource", "validate_source",
           "InstructionDataset", "open_image"]


@dataclass
class ValidationReport:
    path: str
    n_records: int = 0
    problems: list[Problem] = field(default_factory=list)
    record_format: str = ""
    kind: str = ""

    @property
    def bad_indices(self) -> set[int]:
        return {p.index for p in self.problems}

    def format(self, limit: int = 50) -> str:
        lines = [f"{self.path}: {len(self.bad_indices)} of {self.n_records} records have problems"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


@dataclass
class ValidatedSource:
    """A source with its image folder, report, and for each usable record its row and signed token length
    (positive: has images, negative: text only; LLaVA's modality lengths, but exact)."""

    source: Source
    image_folder: str | None
    report: ValidationReport
    rows: np.ndarray      # (n_good,) int64
    lengths: np.ndarray   # (n_good,) int64


def record_id(record, index: int) -> str:
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return "<no id>" if not isinstance(record, dict) else str(index)


def image_problem(ref: ImageRef, image_folder: str | None, check_files: bool) -> str | None:
    """Why the image cannot be used, or None. Reads the header only (a truncated body is found when decoding
    during training: the sample is then skipped and counted)."""
    if isinstance(ref, bytes):
        stream, name = io.BytesIO(ref), f"embedded image ({len(ref)} bytes)"
    else:
        try:
            path = resolve_image_path(ref, image_folder)
        except ValueError as err:
            return str(err)
        if not check_files:
            return None
        if not path.is_file():
            if path.exists():
                return f"image {ref!r} is not a regular file"
            return f"image {ref!r} not found under --image_folder {image_folder!r}"
        stream, name = path, f"image {ref!r}"
    try:
        with Image.open(stream) as img:
            width, height = img.size  # the header is parsed on open; its size is all that is read here
        if width * height > MAX_IMAGE_PIXELS:
            return f"{name}: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed (a decompression bomb?)"
    except UnidentifiedImageError:
        return f"{name} is not a readable image (no image format PIL knows)"
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for bad data
        return f"{name} is not a readable image ({type(err).__name__}: {str(err)[:120]})"
    return None


def open_image(ref: ImageRef, image_folder: str | None) -> Image.Image:
    """Decode an image fully (raises on undecodable data)."""
    if isinstance(ref, bytes):
        return load_image(io.BytesIO(ref))
    return load_image(resolve_image_path(ref, image_folder))


def _check_sample(sample: Sample, tokenizer, template: str, exact_lengths: bool) -> tuple[str | None, int]:
    """(the rendered text when it is needed for exact lengths, number of `<image>`) for a well-formed sample;
    raises ConversationError otherwise. The plain and vicuna templates are string work and always rendered (their
    rules, such as plain's one exchange, are checked so); the chat template (a Jinja render, the slow part of
    validating a large file) only when exact lengths are asked for."""
    messages = to_messages(sample.turns)
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in sample.turns)
    n_images = len(sample.images)
    if n_placeholders > n_images:
        raise ConversationError(f"{n_placeholders} <image> placeholders but {n_images} images")
    if n_placeholders < n_images:
        raise ConversationError(f"{n_images} images but only {n_placeholders} <image> placeholders")
    text = None
    if template != "chat_template" or exact_lengths:
        try:
            text = (tokenizer.apply_chat_template(messages, tokenize=False) if template == "chat_template"
                    else render(messages, tokenizer, template).text)
        except ValueError:
            raise  # ConversationError (a record problem), or a setup error such as a tokenizer without a template
        except Exception as err:  # noqa: BLE001 - a chat template that raises (e.g. roles it refuses)
            raise ConversationError(f"the chat template cannot render it ({type(err).__name__}: {err})") from None
    return text, n_placeholders


def validate_source(source: Source, tokenizer: PreTrainedTokenizerBase, template: str, num_image_tokens: int,
                    image_folder: str | None, max_length: int, check_images: bool = True, exact_lengths: bool = False,
                    progress: bool = True) -> ValidatedSource:
    """Check every record of `source` and collect every problem (not only the first).

    The lengths of the good records are exact token counts with `exact_lengths` (packing needs them; their text
    is tokenized in batches), otherwise LLaVA's estimate (words + image tokens), and then only records that may
    exceed `max_length` are tokenized (a token covers at least one UTF-8 byte: a bound that keeps validating a
    665K-record file fast). Image headers are read by a thread pool (file systems, not the CPU, are the limit).
    """
    report = ValidationReport(source.path, len(source), list(source.parse_problems), source.format, source.kind)
    unparsed = {p.index for p in source.parse_problems}
    good_rows, good_lengths = [], []
    pending: list[tuple[int, str, str | None, Sample, int]] = []  # (index, id, text, sample, n_images)
    pool = ThreadPoolExecutor(max_workers=8)

    def length_of(sample: Sample, counted: int | None, n_images: int) -> int:
        if counted is None:  # LLaVA's estimate: words
            counted = sum(len(t["value"].split()) for t in sample.turns)
        return counted + n_images * num_image_tokens

    def may_be_too_long(sample: Sample, n_images: int) -> bool:
        n_bytes = sum(len(t["value"].encode("utf-8")) for t in sample.turns) + 64 * len(sample.turns) + 512
        return n_bytes + n_images * num_image_tokens > max_length

    def flush() -> None:
        image_errors = list(pool.map(lambda entry: [e for e in (image_problem(ref, image_folder, check_images)
                                                                for ref in entry[3].images) if e], pending))
        counted: list[int | None] = [None] * len(pending)
        if exact_lengths:
            pieces = [[c for c in text.split(IMAGE_PLACEHOLDER) if c] for _, _, text, _, _ in pending]
            flat = [c for chunks in pieces for c in chunks]
            counts = iter(map(len, tokenizer(flat, add_special_tokens=False)["input_ids"])) if flat else iter(())
            counted = [sum(next(counts) for _ in chunks) for chunks in pieces]
        for (index, rid, text, sample, n_images), errors, n_text in zip(pending, image_errors, counted):
            if errors:
                report.problems.extend(Problem(index, rid, e) for e in errors)
                continue
            length = length_of(sample, n_text, n_images)
            if (length > max_length) if exact_lengths else may_be_too_long(sample, n_images):
                # The full tokenization says whether truncation is harmless (it never cuts an image).
                try:
                    input_ids, labels = tokenize_conversation(sample.turns, tokenizer, template, num_image_tokens,
                                                              max_length)
                except ConversationError as err:
                    report.problems.append(Problem(index, rid, str(err)))
                    continue
                if not bool((labels != IGNORE_INDEX).any()):
                    report.problems.append(Problem(index, rid, "every label is masked after truncation to "
                                                               f"--model_max_length {max_length}"))
                    continue
                if exact_lengths:
                    length = len(input_ids)
            good_rows.append(index)
            good_lengths.append(length if n_images else -length)
        pending.clear()

    records = source.iter_records()
    if progress and len(source) >= 20_000:
        records = tqdm(records, total=len(source), desc=f"checking {source.path}", unit=" records")
    try:
        for index, record in records:
            if index in unparsed:
                continue
            rid = record_id(record, index)
            try:
                sample = to_sample(record, source.format)
                text, n_images = _check_sample(sample, tokenizer, template, exact_lengths)
            except ConversationError as err:
                report.problems.append(Problem(index, rid, str(err)))
                continue
            pending.append((index, rid, text, sample, n_images))
            if len(pending) >= 512:
                flush()
        flush()
    finally:
        pool.shutdown()
    report.problems.sort(key=lambda p: p.index)
    order = np.argsort(np.asarray(good_rows, dtype=np.int64), kind="stable")
    return ValidatedSource(source, image_folder, report, np.asarray(good_rows, dtype=np.int64)[order],
                           np.asarray(good_lengths, dtype=np.int64)[order])


class InstructionDataset(torch.utils.data.Dataset):
    """The training samples: entry i is row `rows[i]` of source `source_ids[i]` (a mixture may repeat rows).

    Item: {"input_ids": (T,), "labels": (T,), "pixel_values": (n_img, 3, S, S) | None, "id"}. An image that fails
    to decode yields None (the collator drops and counts it); the warning names the source, row and id.
    """

    def __init__(self, parts: list[ValidatedSource], source_ids: np.ndarray, rows: np.ndarray, lengths: np.ndarray,
                 tokenizer: PreTrainedTokenizerBase, template: str, num_image_tokens: int,
                 image_processor: ImageProcessor, max_length: int):
        self.parts, self.source_ids, self.rows, self._lengths = parts, source_ids, rows, lengths
        self.tokenizer, self.template, self.num_image_tokens = tokenizer, template, num_image_tokens
        self.image_processor, self.max_length = image_processor, max_length

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> list[int]:
        """Tokens per sample (exact when validated with exact_lengths, LLaVA's estimate otherwise): positive
        with images, negative without."""
        return self._lengths.tolist()

    def __getitem__(self, index: int | tuple[int, int]) -> dict | None:
        """index: a sample, or (packed row, sample) as data.collate.packed_epoch_batches draws them."""
        if isinstance(index, tuple):
            row_in_batch, index = index
            item = self[index]
            return None if item is None else {**item, "row": row_in_batch}
        part = self.parts[int(self.source_ids[index])]
        row = int(self.rows[index])
        record = part.source.record(row)
        sample = to_sample(record, part.source.format)
        input_ids, labels = tokenize_conversation(sample.turns, self.tokenizer, self.template, self.num_image_tokens,
                                                  self.max_length)
        pixel_values = None
        if sample.images:
            try:
                pixel_values = torch.stack([self.image_processor(open_image(ref, part.image_folder))
                                            for ref in sample.images])
            except Exception as err:  # noqa: BLE001 - any decode failure: skip the sample, keep training
                log.warning("skipping %s record %d (id %s): an image failed to decode (%s)", part.source.path, row,
                            record_id(record, row), err)
                return None
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
                "id": record_id(record, row)}
