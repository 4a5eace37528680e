"""Resumable checkpoints: DeepSpeed state + per-rank RNG + data position + the inference files.

Layout: OUTPUT_DIR/checkpoints/step-K/ and OUTPUT_DIR/checkpoints/latest (the name of the newest
complete step). A step is written under a temporary name and renamed only when every rank has
finished, and `latest` is replaced atomically afterwards, so a crash while saving leaves `latest`
on the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
TMP_PREFIX = "tmp-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints (`step-K` folders), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    steps = [p for p in checkpoints_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def latest_checkpoint(checkpoints_dir: Path) -> str | None:
    """Tag of the newest complete checkpoint, or None.

    `latest` names it. A step folder only ever appears complete (it is renamed from its temporary
    name), so when `latest` is missing or names a folder that is gone (a crash between the rename
    and the write of `latest`, or while an equal step was replaced), the newest step folder is used.
    """
    latest = checkpoints_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and (checkpoints_dir / tag).is_dir():
            return tag
    steps = step_folders(checkpoints_dir)
    return steps[-1].name if steps else None


def remove_partial_checkpoints(checkpoints_dir: Path) -> None:
    """Delete leftovers of a save that was interrupted (rank 0 only)."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk, so the rename that publishes it never outruns its content."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_checkpoint(engine, checkpoints_dir: Path, step: int, client_state: dict, write_inference_files,
                             save_total_limit: int) -> Path:
    """Collective: every rank calls it. `write_inference_files(folder)` writes the adapter/projector files
    (it gathers ZeRO-3 parameters itself, so it is collective too)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag, tmp_tag = f"step-{step}", f"{TMP_PREFIX}step-{step}"
    # Frozen base weights are not written: they come from the base model, and a 7B LM would add 13 GB per step.
    engine.save_checkpoint(str(checkpoints_dir), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), checkpoints_dir / tmp_tag / f"rng_state_{rank}.pt")
    write_inference_files(checkpoints_dir / tmp_tag)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _fsync_tree(checkpoints_dir / tmp_tag)
        final = checkpoints_dir / tag
        if final.exists():  # the same step saved again (a rerun): latest_checkpoint falls back meanwhile
            shutil.rmtree(final)
        os.replace(checkpoints_dir / tmp_tag, final)
        _write_atomically(checkpoints_dir / LATEST, tag)
        # Prune the oldest, never the one just written (a stale newer folder of an earlier run may exist).
        others = [p for p in step_folders(checkpoints_dir) if p.name != tag]
        for old in others[:max(0, len(others) - (save_total_limit - 1))] if save_total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return checkpoints_dir / tag


def load_training_checkpoint(engine, checkpoints_dir: Path, tag: str) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_path, client_state = engine.load_checkpoint(str(checkpoints_dir), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True,
                                                     load_module_strict=False)  # frozen weights are not saved
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {checkpoints_dir / tag}")
    rng_file = checkpoints_dir / tag / f"rng_state_{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
