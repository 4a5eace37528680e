"""Data mixtures: several sources, each with a sampling ratio or a fixed number of samples, drawn
deterministically for a seed; and the exact mixture used, written beside the checkpoint.

A mixture file (`--data_mixture mix.yaml`, or `--data_path mix.yaml` as LLaVA-NeXT spells it):

    datasets:
      - path: llava_v1_5_mix665k.json          # LLaVA-NeXT's `json_path` is accepted too
        image_folder: data                     # default: --image_folder
      - path: the_cauldron/ai2d                # any source --data_path accepts
        ratio: 0.5                             # this share of its usable records (2.0: each one twice)
      - path: sharegpt.jsonl
        samples: 10000                         # exactly this many (repeating records when it has fewer)
      - path: extra.json
        sampling_strategy: "random:10%"        # LLaVA-NeXT: all | first:N | end:N | random:N, N a count or N%

Optional per source: `format` (llava | sharegpt | openai | cauldron; detected when absent), `split`, `config`
(for hub-layout folders), `name`. Relative paths are relative to the mixture file's folder. Records are drawn
from the usable ones (after validation) with a generator seeded from --seed and the source's position, so a
seed always gives the same mixture; the epoch order then shuffles all sources together.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .dataset import ValidatedSource, validate_source
from .sources import DataValidationError, open_source

MIXTURE_FILE = "data_mixture.json"
SOURCE_KEYS = {"path", "json_path", "image_folder", "format", "split", "config", "name", "ratio", "samples",
               "sampling_strategy"}
LLAVA_NEXT_STRATEGY = re.compile(r"(all)|(first|end|random):(\d+(?:\.\d+)?)(%?)")


@dataclass
class SourceSpec:
    path: str
    image_folder: str | None = None
    format: str | None = None
    split: str | None = None
    config: str | None = None
    name: str | None = None
    strategy: str = "all"  # all | ratio:X | samples:N | first:N | end:N | random:N (N a count or N%)


def is_mixture_file(path: str | None) -> bool:
    return bool(path) and Path(path).suffix.lower() in (".yaml", ".yml")


def read_mixture(path: str, default_image_folder: str | None) -> list[SourceSpec]:
    """Parse a mixture file; every problem ends in one DataValidationError naming the file and the entry."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--data_mixture {path}: no such file")
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataValidationError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataValidationError(f"{path}: expected a top-level `datasets:` list of sources")
    if set(doc) - {"datasets"}:
        raise DataValidationError(f"{path}: unknown top-level keys {sorted(set(doc) - {'datasets'})}")
    base = file.parent
    specs = []
    for i, entry in enumerate(entries):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict):
            raise DataValidationError(f"{where} must be a mapping with a `path`")
        unknown = set(entry) - SOURCE_KEYS
        if unknown:
            raise DataValidationError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(SOURCE_KEYS)})")
        source = entry.get("path", entry.get("json_path"))
        if not isinstance(source, str) or not source:
            raise DataValidationError(f"{where}: needs a `path`")
        given = [k for k in ("ratio", "samples", "sampling_strategy") if k in entry]
        if len(given) > 1:
            raise DataValidationError(f"{where}: give one of ratio, samples or sampling_strategy, not {given}")
        strategy = parse_strategy(entry, where)
        folder = entry.get("image_folder", default_image_folder)
        specs.append(SourceSpec(path=str(base / source), image_folder=str(base / folder) if folder else None,
                                format=entry.get("format"), split=entry.get("split"), config=entry.get("config"),
                                name=str(entry.get("name") or source), strategy=strategy))
    return specs


def parse_strategy(entry: dict, where: str) -> str:
    if "ratio" in entry:
        ratio = entry["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or not math.isfinite(ratio):
            raise DataValidationError(f"{where}: ratio must be a positive number, got {ratio!r}")
        return f"ratio:{ratio}"
    if "samples" in entry:
        samples = entry["samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise DataValidationError(f"{where}: samples must be a positive whole number, got {samples!r}")
        return f"samples:{samples}"
    strategy = str(entry.get("sampling_strategy", "all")).strip()
    match = LLAVA_NEXT_STRATEGY.fullmatch(strategy)
    if not match or (not match.group(1) and not match.group(4) and "." in match.group(3)):
        raise DataValidationError(f"{where}: sampling_strategy {strategy!r}: use all, first:N, end:N or random:N "
                                  "(N a count or a percentage such as 10%)")
    return strategy


def single_source(data_path: str, image_folder: str | None) -> list[SourceSpec]:
    return [SourceSpec(path=data_path, image_folder=image_folder, name=data_path)]


def select(n: int, strategy: str, rng: random.Random) -> np.ndarray:
    """Positions (into a source's n usable records) that the strategy takes, in a fixed order."""
    kind, _, value = strategy.partition(":")
    if kind == "all" or n == 0:
        return np.arange(n)
    if kind in ("ratio", "samples"):
        count = round(float(value) * n) if kind == "ratio" else int(value)
        copies, rest = divmod(count, n)
        return np.concatenate([np.tile(np.arange(n), copies), np.sort(rng.sample(range(n), rest))]).astype(np.int64)
    count = min(n, round(n * float(value[:-1]) / 100) if value.endswith("%") else int(value))
    if kind == "first":
        return np.arange(count)
    if kind == "end":
        return np.arange(n - count, n)
    return np.sort(np.asarray(rng.sample(range(n), count), dtype=np.int64))  # random


@dataclass
class Mixture:
    parts: list[ValidatedSource]
    source_ids: np.ndarray   # (n_samples,) which part each sample comes from
    rows: np.ndarray         # (n_samples,) the row in that part's source
    lengths: np.ndarray      # (n_samples,) signed exact token lengths
    record: dict             # what data_mixture.json holds

    @property
    def reports(self):
        return [p.report for p in self.parts]

    @property
    def n_bad(self) -> int:
        return sum(len(p.report.bad_indices) for p in self.parts)


def load_mixture(specs: list[SourceSpec], tokenizer, template: str, num_image_tokens: int, max_length: int,
                 skip_bad_samples: bool, seed: int, cache_dir: str | None = None, exact_lengths: bool = False,
                 progress: bool = True) -> Mixture:
    """Open and validate every source, then draw each one's share. Raises DataValidationError listing every
    problem of every source unless `skip_bad_samples`."""
    parts = []
    for spec in specs:
        source = open_source(spec.path, spec.format, spec.split, spec.config, cache_dir)
        parts.append(validate_source(source, tokenizer, template, num_image_tokens, spec.image_folder, max_length,
                                     exact_lengths=exact_lengths, progress=progress))
    bad = [p.report for p in parts if p.report.problems]
    if bad and not skip_bad_samples:
        raise DataValidationError("\n".join(r.format() for r in bad) +
                                  "\nFix these records or pass --skip_bad_samples to train on the rest.")
    source_ids, rows, lengths, described = [], [], [], []
    for i, (spec, part) in enumerate(zip(specs, parts)):
        if not len(part.rows):
            raise DataValidationError(f"{spec.path}: no usable records")
        taken = select(len(part.rows), spec.strategy, random.Random(seed * 1_000_003 + i))
        source_ids.append(np.full(len(taken), i, dtype=np.int64))
        rows.append(part.rows[taken])
        lengths.append(part.lengths[taken])
        described.append(describe(spec, part, part.rows[taken]))
    record = {"seed": seed, "samples": int(sum(len(r) for r in rows)), "sources": described}
    return Mixture(parts, np.concatenate(source_ids), np.concatenate(rows), np.concatenate(lengths), record)


def describe(spec: SourceSpec, part: ValidatedSource, rows: np.ndarray) -> dict:
    spec_fields = {k: v for k, v in asdict(spec).items() if v is not None}
    spec_fields["path"] = str(Path(spec.path).resolve())
    if spec.image_folder:
        spec_fields["image_folder"] = str(Path(spec.image_folder).resolve())
    return {**spec_fields, "kind": part.source.kind, "format": part.source.format,
            "records": part.report.n_records, "bad_records": len(part.report.bad_indices), "usable": len(part.rows),
            "taken": int(len(rows)), "rows_sha256": hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest(),
            "rows": runs(rows)}


def runs(rows: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...] covering `rows` in order (consecutive rows collapse into one run)."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [[int(rows[a]), int(rows[b - 1]) + 1] for a, b in zip(starts, stops)]


def write_mixture(record: dict, folder: Path) -> None:
    (folder / MIXTURE_FILE).write_text(json.dumps(record, indent=1))


def mixture_differences(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's mixture and this run's (resuming exactly needs none)."""
    diffs = []
    if saved.get("seed") != current["seed"]:
        diffs.append(f"seed {saved.get('seed')} -> {current['seed']}")
    old, new = saved.get("sources", []), current["sources"]
    if [s.get("path") for s in old] != [s["path"] for s in new]:
        return diffs + [f"sources {[s.get('path') for s in old]} -> {[s['path'] for s in new]}"]
    for a, b in zip(old, new):
        for key in ("format", "strategy", "records", "usable", "taken", "rows_sha256"):
            if a.get(key) != b[key]:
                diffs.append(f"{b['path']}: {key} {a.get(key)} -> {b[key]}")
    return diffs
