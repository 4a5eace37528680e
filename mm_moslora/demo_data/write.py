"""Writing a whole demo data set: ``generate`` (the entry point), ``read_manifest`` and the re-run rules.

Order matters for the output: records are drawn first (pretraining, finetuning, then each benchmark, since
evaluation scenes must differ from training ones), images are drawn after all records, and
``manifest.json`` is written last, so its presence means the folder is complete. Re-running with the same
arguments finds that manifest and writes nothing; a run that was cut off leaves a marker file, so the next
run may clear what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .benchmarks import EVAL_BENCHMARKS
from .jsonfiles import write_json
from .render import draw_all
from .run import IMAGE_FOLDER, GenerationRun
from .training_files import finetune_records, pretrain_records
from .vocabulary import HELD_OUT_COMBINATIONS, Combo, all_combinations

FORMAT_VERSION = 1  # in the manifest's arguments: bump it when any output changes, so old data is not reused


class DemoDataExistsError(RuntimeError):
    """The output folder holds data generated with other arguments (or foreign files)."""


_OUTPUTS = ("images/train", "images/eval", "eval", "pretrain.json", "finetune.json",
            "scenes.json", "manifest.json")
_IN_PROGRESS = ".demo_data_incomplete"


def _clear_outputs(out: Path) -> None:
    """Remove only what a previous run of this generator wrote."""
    (out / "manifest.json").unlink(missing_ok=True)  # first: a crash below must not look complete
    for rel in _OUTPUTS:
        p = out / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete run in ``out_dir``, or None."""
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def generate(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 4000,
             n_pretrain: int = 4000, n_eval: int = 300, image_size: int = 64, workers: int = 1,
             overwrite: bool = False, held_out: Sequence[Combo] = HELD_OUT_COMBINATIONS,
             progress: bool = True) -> dict:
    """Generate the whole demo data set under ``out_dir`` and return its manifest.

    Args:
        out_dir: output folder (created). Image paths in every record are relative to
            ``out_dir/images`` (the ``--image-folder`` to pass to training and evaluation).
        seed: base seed; the same arguments give identical files.
        n_train: finetune samples (about 5% text-only, the rest 1-3 QA turns on an image).
        n_pretrain: caption samples (one image each).
        n_eval: questions per benchmark (per split for POPE; MME gets ``n_eval/8`` images per
            subtask, two questions each).
        image_size: image side in pixels (64 default; 64-224 intended).
        workers: processes that draw images (output does not depend on it).
        overwrite: replace a previous run made with other arguments.
        held_out: (colour, shape) pairs kept out of all training images and texts.
        progress: show a tqdm bar while drawing.

    Returns:
        The manifest (also written last to ``out_dir/manifest.json``), plus ``"status"``:
        ``"generated"``, or ``"already generated"`` when a complete run with the same arguments
        was found (nothing is written then).

    Raises:
        DemoDataExistsError: the folder holds another run (or unknown files) and not ``overwrite``.
        ValueError: invalid arguments.
    """
    if image_size < 16 or image_size > 1024:
        raise ValueError(f"image_size must be in 16..1024, got {image_size}")
    if min(n_train, n_pretrain) < 0 or n_eval < 2:
        raise ValueError("n_train and n_pretrain must be >= 0 and n_eval >= 2")
    held_out = [tuple(cs) for cs in held_out]
    unknown = [cs for cs in held_out if cs not in all_combinations()]
    if unknown:
        raise ValueError(f"unknown held-out combinations {unknown}")
    arguments = {"seed": int(seed), "n_train": int(n_train), "n_pretrain": int(n_pretrain),
                 "n_eval": int(n_eval), "image_size": int(image_size),
                 "held_out": [list(cs) for cs in held_out], "format_version": FORMAT_VERSION}
    out = Path(out_dir)
    previous = read_manifest(out)
    if previous is not None:
        if previous.get("arguments") == arguments:
            return {**previous, "status": "already generated"}
        if not overwrite:
            diff = {k: (previous.get("arguments", {}).get(k), v) for k, v in arguments.items()
                    if previous.get("arguments", {}).get(k) != v}
            raise DemoDataExistsError(
                f"{out} already holds demo data generated with other arguments "
                f"(existing -> requested: {diff}); pass --overwrite to replace it")
    elif out.exists() and any(out.iterdir()) and not (out / _IN_PROGRESS).exists() and not overwrite:
        raise DemoDataExistsError(f"{out} is not empty and holds no demo-data manifest; "
                                  "choose an empty folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / _IN_PROGRESS).touch()  # marks the folder's content as ours while the run is partial
    _clear_outputs(out)

    run = GenerationRun(out, int(seed), held_out)
    pretrain = pretrain_records(run, n_pretrain)
    finetune = finetune_records(run, n_train)
    benches = {name: make(run, n_eval) for name, make in EVAL_BENCHMARKS.items()}
    draw_all(run.jobs, image_size, workers, progress)
    for src, dst in benches["mme"].pop("links"):  # MME's release layout holds the images too
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(out / IMAGE_FOLDER / src, dst)
        except OSError:
            shutil.copyfile(out / IMAGE_FOLDER / src, dst)
    write_json(out / "pretrain.json", pretrain)
    write_json(out / "finetune.json", finetune)
    write_json(out / "scenes.json", run.scenes, indent=None)

    # Paths relative to out_dir; per benchmark: "benchmark" (eval/score.py --benchmark),
    # "question_file", "annotation_files" (each one --annotation-file), optional "split_file".
    index = {"image_folder": IMAGE_FOLDER, "held_out_flag": "metadata.held_out", "benchmarks": {}}
    counts: dict[str, Any] = {
        "pretrain": len(pretrain), "finetune": len(finetune),
        "finetune_text_only": sum("image" not in r for r in finetune),
        "finetune_turns": sum(len(r["conversations"]) // 2 for r in finetune),
        "train_images": sum(1 for rel in run.scenes if rel.startswith("train/")),
        "eval_images": sum(1 for rel in run.scenes if rel.startswith("eval/"))}
    for name, info in benches.items():
        rows = info.pop("rows")
        index["benchmarks"][name] = {"benchmark": name, **info}
        counts[f"eval_{name}"] = len(rows)
        counts[f"eval_{name}_held_out"] = sum(r["metadata"]["held_out"] for r in rows)
    write_json(out / "eval" / "index.json", index)

    manifest = {"generator": "mm_moslora.demo_data", "arguments": arguments, "counts": counts,
                "image_folder": IMAGE_FOLDER,
                "files": {"pretrain": "pretrain.json", "finetune": "finetune.json",
                          "scenes": "scenes.json", "eval_index": "eval/index.json"},
                "held_out_combinations": [f"{c} {s}" for c, s in held_out]}
    write_json(out / "manifest.json", manifest, indent=2)  # last: its presence means complete
    (out / _IN_PROGRESS).unlink(missing_ok=True)
    return {**manifest, "status": "generated"}
