"""Where records come from: a JSON / JSONL file, a Parquet file or folder, a `datasets` save_to_disk folder,
or a local folder in the Hugging Face hub's layout.

Arrow-backed sources (everything but JSON) stay memory-mapped: rows are read one at a time, as raw Python
values (`datasets.Image` columns as {"bytes", "path"}, never decoded here), so data larger than memory trains.
Parquet is converted once into `datasets`' Arrow cache (HF_DATASETS_CACHE), as `datasets` always does.
JSON and JSONL are parsed in full (a JSON list cannot be read in part) and kept as compact Arrow strings.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..errors import InputError
from .conversation import ConversationError
from .formats import FORMATS, detect_format, record_format

SAVE_TO_DISK_FILES = ("state.json", "dataset_info.json")
DATASET_DICT_FILE = "dataset_dict.json"


class DataValidationError(InputError):
    """The data has problems; the message lists every one with its source, record index and id."""


@dataclass
class Problem:
    index: int
    record_id: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index} (id {self.record_id}): {self.message}"


@dataclass
class Source:
    """One file or dataset. `record(i)` is the raw record i (a dict, or whatever a JSON file holds there)."""

    path: str
    kind: str                      # json | jsonl | parquet | arrow (save_to_disk) | hub (folder in the hub layout)
    format: str                    # one of formats.FORMATS
    rows: object                   # pa.Array of JSON texts (json, jsonl) or a datasets.Dataset in arrow format
    parse_problems: list[Problem] = field(default_factory=list)  # lines that are not JSON (jsonl)

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int):
        if isinstance(self.rows, (pa.Array, pa.ChunkedArray)):
            text = self.rows[index].as_py()
            return None if text is None else json.loads(text)
        return self.rows[index].to_pylist()[0]

    def iter_records(self, batch_size: int = 1024) -> Iterator[tuple[int, object]]:
        if isinstance(self.rows, (pa.Array, pa.ChunkedArray)):
            for index, text in enumerate(self.rows.to_pylist()):
                yield index, None if text is None else json.loads(text)
            return
        index = 0
        for batch in self.rows.iter(batch_size=batch_size):
            for record in batch.to_pylist():
                yield index, record
                index += 1

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {self.format} records)"


def open_source(path: str | Path, fmt: str | None = None, split: str | None = None,
                config: str | None = None, cache_dir: str | None = None) -> Source:
    """Open any supported data source; the record format is detected unless `fmt` names it.

    Raises FileNotFoundError for a missing path and DataValidationError (one line) for an unreadable one.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data_path {path}: no such file or folder")
    if fmt is not None and fmt not in FORMATS:
        raise DataValidationError(f"{path}: unknown record format {fmt!r}; choose one of {FORMATS}")
    if p.is_file() and p.suffix.lower() in (".json", ".jsonl"):
        return _json_source(p, fmt)
    try:
        dataset, kind = _arrow_dataset(p, split, config, cache_dir)
    except (DataValidationError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow / datasets raise many kinds; the user needs one line
        raise DataValidationError(f"{path}: cannot be read as a dataset ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
    rows = dataset.with_format("arrow")
    if fmt is None:
        votes: Counter = Counter()
        first = dataset.select(range(min(len(dataset), 256))).with_format("arrow")[:].to_pylist()
        votes.update(f for f in map(record_format, first) if f)
        try:
            fmt = detect_format(votes, set(dataset.column_names), str(path))
        except ConversationError as err:
            raise DataValidationError(str(err)) from None
    return Source(str(path), kind, fmt, rows)


def _arrow_dataset(p: Path, split: str | None, config: str | None, cache_dir: str | None):
    import datasets

    if p.is_dir() and ((p / DATASET_DICT_FILE).is_file() or all((p / f).is_file() for f in SAVE_TO_DISK_FILES)):
        loaded, kind = datasets.load_from_disk(str(p)), "arrow"
    elif p.is_file() and p.suffix.lower() == ".parquet":
        loaded, kind = datasets.load_dataset("parquet", data_files=str(p), cache_dir=cache_dir), "parquet"
    elif p.is_dir():
        parquet = sorted(p.rglob("*.parquet"))
        if parquet and not (p / "README.md").is_file() and all(f.parent == p for f in parquet):
            # A plain folder of Parquet files (the hub layout needs a README or data/ subfolders).
            loaded, kind = datasets.load_dataset("parquet", data_files=[str(f) for f in parquet],
                                                 cache_dir=cache_dir), "parquet"
        else:
            loaded, kind = datasets.load_dataset(str(p), name=config, cache_dir=cache_dir), "hub"
    else:
        raise DataValidationError(f"{p}: not a supported data file (JSON, JSONL, Parquet, or a dataset folder)")
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if "train" not in loaded and len(loaded) != 1:
                raise DataValidationError(f"{p}: several splits {sorted(loaded)} and none is 'train'; name one "
                                          "with `split:` in a --data_mixture file")
            split = "train" if "train" in loaded else next(iter(loaded))
        if split not in loaded:
            raise DataValidationError(f"{p}: no split {split!r} (it has {sorted(loaded)})")
        loaded = loaded[split]
    elif split not in (None, "train"):
        raise DataValidationError(f"{p}: a single dataset without splits; remove `split: {split}`")
    return loaded, kind


def _json_source(p: Path, fmt: str | None) -> Source:
    """JSON list or JSONL. A JSONL line that is not JSON becomes a problem (with its line number) and an empty
    row, so record indices count every non-blank line."""
    texts: list[str | None] = []
    problems: list[Problem] = []
    fields: set[str] = set()
    votes: Counter = Counter()

    def keep(record) -> None:
        if isinstance(record, dict):
            fields.update(record)
            own = record_format(record)
            if own:
                votes[own] += 1
        texts.append(json.dumps(record))

    with p.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            records = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{p}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        for record in records:
            keep(record)
        kind = "json"
    else:
        single = _single_json_value(p, head)
        if single is not None:
            raise DataValidationError(f"{p}: {single}")
        with p.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    problems.append(Problem(len(texts), f"<line {line_no}>", f"invalid JSON: {err.msg}"))
                    texts.append(None)
                    continue
                keep(record)
        kind = "jsonl"
    if fmt is None:
        try:
            fmt = detect_format(votes, fields, str(p))
        except ConversationError as err:
            raise DataValidationError(str(err)) from None
    return Source(str(p), kind, fmt, pa.array(texts, pa.large_string()), problems)


def _single_json_value(p: Path, head: str) -> str | None:
    """Why the file is not JSONL, when it is one JSON value written over several lines; None otherwise."""
    first_line = head.split("\n", 1)[0]
    try:
        json.loads(first_line)
        return None  # the first line is a whole value: JSONL
    except json.JSONDecodeError:
        pass
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # not one value either: JSONL whose first line is broken (reported per line)
    if not isinstance(value, dict):
        return f"the file holds one JSON {type(value).__name__}, not records (a JSON list, or one object per line)"
    lists = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    hint = (f"; its key {lists[0]!r} holds a list of {len(value[lists[0]])} objects: save that list as the file"
            if lists else "")
    return f"the file holds one JSON object, not a list of records (a JSON list, or one object per line){hint}"
