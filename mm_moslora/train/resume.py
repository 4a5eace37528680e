"""Resuming with other flags: what may change, what must match the checkpoint.

Every step folder records the run's flags (checkpoint.TRAINING_ARGS). On resume, every flag must have the
value it had, except those in MAY_CHANGE: they change neither the model, nor the data, nor the optimisation
of the steps already taken. A flag the checkpoint does not record (added to mm_moslora since) must be at its
default. The refusal lists every difference on one line.

Changing the length of the run (--max_steps, --num_train_epochs) is allowed: the learning-rate schedule is
then recomputed for the new total (warmup and decay stretch to it), as Hugging Face's Trainer does; the run
warns that it does.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .checkpoint import CheckpointError, read_training_args

log = logging.getLogger(__name__)

# Flags that only say how long to run, where and how often to write, how to report, or how to compute the same
# numbers (attention kernel, activation checkpointing and its memory budget, TF32 matmuls, fused kernels, loader
# processes).
MAY_CHANGE = frozenset({
    "num_train_epochs", "max_steps", "total_steps", "save_steps", "save_strategy", "save_total_limit",
    "logging_steps", "report_to", "output_dir", "resume", "local_rank", "dataloader_num_workers", "deepspeed",
    "attn_implementation", "gradient_checkpointing", "activation_memory_budget_gib", "tf32", "use_liger_kernel",
    "use_dropout_kernel", "torch_compile",
    "lazy_preprocess",
    "trust_remote_code",
    "allow_images_outside_folder",  # the data is validated again either way
})


def _normalised(value):
    """Paths as absolute paths (a resume may start from another working directory); JSON-safe values."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.abspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    return str(value)


def training_record(args: argparse.Namespace, **derived) -> dict:
    """The flags of this run (plus derived values such as world_size, zero_stage, total_steps) as JSON values."""
    return {key: _normalised(value) for key, value in {**vars(args), **derived}.items()}


def _shown(value) -> str:
    return "(unset)" if value is None else str(value)


def resume_differences(recorded: dict, current: dict, defaults: dict) -> list[str]:
    """'--flag old -> new' for every flag outside MAY_CHANGE whose value differs from the checkpoint's."""
    differences = []
    for key in sorted(current.keys() | recorded.keys()):
        if key in MAY_CHANGE:
            continue
        if key in recorded:
            old = recorded[key]
        elif key in defaults:
            old = _normalised(defaults[key])  # a flag added since: the checkpoint ran at its default
        else:
            continue
        new = current.get(key, _normalised(defaults.get(key)))
        if old != new and not (isinstance(old, (int, float)) and isinstance(new, (int, float))
                               and not isinstance(old, bool) and float(old) == float(new)):
            name = key if key in ("world_size", "zero_stage") else f"--{key}"
            differences.append(f"{name} {_shown(old)} -> {_shown(new)}")
    return differences


def check_resume_flags(step_folder: Path, current: dict, defaults: dict) -> dict | None:
    """Refuse (CheckpointError) a resume whose flags differ from those recorded in `step_folder`.

    Returns the recorded flags, or None for a checkpoint written before flags were recorded (then nothing can be
    compared, and a warning says so)."""
    recorded = read_training_args(step_folder)
    if recorded is None:
        log.warning("%s does not record its training flags (written by an older mm_moslora): resuming without "
                    "checking that they match", step_folder)
        return None
    differences = resume_differences(recorded, current, defaults)
    if differences:
        raise CheckpointError(
            f"{step_folder}: cannot resume with other flags than the checkpoint's: {', '.join(differences)} "
            f"(use the checkpoint's values, a new --output_dir, or --resume False to start over)")
    return recorded
