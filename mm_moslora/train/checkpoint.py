"""Resumable checkpoints: DeepSpeed state + per-rank RNG + data position + the inference files.

Layout: OUTPUT_DIR/checkpoints/step-K/ and OUTPUT_DIR/checkpoints/latest (the name of the newest
complete step). A step is written under a temporary name and renamed only when every rank has
finished, and `latest` is replaced atomically afterwards, so a crash while saving leaves `latest`
on the previous complete checkpoint.

Loading never runs code from a checkpoint (docs/bad_input.md):
- every `torch.load` while resuming, DeepSpeed's own included, is `weights_only=True`: tensors, plain
  containers and numbers, plus four DeepSpeed classes rebuilt field by field (DEEPSPEED_STATE_CLASSES) — no
  callable named by the file is ever called, so a crafted file can fail to load but cannot execute;
- `manifest.json` lists the size and SHA-256 of every file of the step folder, written last; before
  DeepSpeed opens anything, the folder must match it exactly (a truncated, swapped, missing or added file is
  refused with its name). It is a checksum, not a signature: it catches corruption and mixed-up folders,
  not someone who rewrites the manifest too — weights-only loading is what makes such a folder harmless;
- `latest` must name a `step-K` folder inside the checkpoints folder (no path, no symlink out);
- the RNG state is stored as tensors and plain lists, and a step without this rank's RNG file is refused
  (it would resume, but not reproduce the interrupted run).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import InputError

log = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = "tmp-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TRAINING_ARGS = "training_args.json"
STEP_NAME = re.compile(r"step-(\d+)")


class CheckpointError(InputError):
    """A checkpoint folder that cannot be resumed from; the message names the file and the reason."""


# ---------------------------------------------------------------- RNG state (weights-only loadable)
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as tensors, ints and lists: no pickled objects."""
    version, internal, gauss = random.getstate()
    bit_generator, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                             numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:  # written before tensors were used: numpy's own tuple (loaded weights-only with LEGACY_RNG_CLASSES)
        np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _legacy_rng_classes() -> list:
    """What older rng_state files hold besides tensors: numpy's uint32 key array. Rebuilding an ndarray calls no
    code chosen by the file (torch's weights-only unpickler builds it from raw bytes and a dtype)."""
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rng_state(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_legacy_rng_classes()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure: refused, never retried with full unpickling
        raise CheckpointError(f"{path}: not a loadable RNG state ({_first_line(err)})") from None
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
        raise CheckpointError(f"{path}: not an RNG state written by mm_moslora")
    return state


# ---------------------------------------------------------------- weights-only loading of DeepSpeed's files
def deepspeed_state_classes() -> list[type]:
    """The classes DeepSpeed pickles into its state files besides tensors and containers (found by listing the
    globals of ZeRO-0/2/3, offload, fp32 and bf16 checkpoints): rebuilt from their fields, no code run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block, every `torch.load` (DeepSpeed calls it with weights_only=False) is weights-only.

    A file needing anything else fails with torch's UnpicklingError instead of running it."""
    original = torch.load
    allowed = deepspeed_state_classes()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ---------------------------------------------------------------- manifest (integrity of a step folder)
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if (p.is_file() or p.is_symlink()) and p.name != MANIFEST}


def write_manifest(folder: Path) -> None:
    """Record size and SHA-256 of every file of `folder` (called once all of them are written)."""
    files = {}
    for name, path in _folder_files(folder).items():
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symlink in a checkpoint being written")
        files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    _write_atomically(folder / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def verify_manifest(folder: Path) -> bool:
    """Check `folder` against its manifest; False when it has none (written before manifests existed).

    Raises CheckpointError naming the first file that is missing, added, a symlink, or of another size or digest.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(listed, dict)
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{manifest_path}: not a manifest written by mm_moslora") from None
    present = _folder_files(folder)
    for name in sorted(present.keys() - listed.keys()):
        raise CheckpointError(f"{folder}: {name} was not written with this checkpoint (not in {MANIFEST})")
    for name, (size, digest) in sorted(listed.items()):
        path = present.get(name)
        if path is None:
            raise CheckpointError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if path.is_symlink():
            raise CheckpointError(f"{folder}: {name} is a symlink; checkpoint files must be real files")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {name} differs from the file written with this checkpoint: "
                                  f"{path.stat().st_size} bytes instead of {size} (truncated or replaced)")
        if _sha256(path) != digest:
            raise CheckpointError(f"{folder}: {name} differs from the file written with this checkpoint "
                                  f"(SHA-256 mismatch)")
    return True


# ---------------------------------------------------------------- step folders
def step_folders(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints (`step-K` folders, real folders), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    steps = [p for p in checkpoints_dir.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def latest_checkpoint(checkpoints_dir: Path) -> str | None:
    """Tag of the newest complete checkpoint, or None.

    `latest` names it. A step folder only ever appears complete (it is renamed from its temporary
    name), so when `latest` is missing or names a folder that is gone (a crash between the rename
    and the write of `latest`, or while an equal step was replaced), the newest step folder is used.
    A `latest` that names anything but a `step-K` folder of this directory is refused, not followed.
    """
    latest = checkpoints_dir / LATEST
    if latest.is_symlink() or latest.exists() and not latest.is_file():
        raise CheckpointError(f"{latest}: must be a plain file naming a step folder")
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if tag and not STEP_NAME.fullmatch(tag):
            raise CheckpointError(f"{latest} names {tag[:80]!r}, not a step-K folder of {checkpoints_dir}")
        if tag and (checkpoints_dir / tag).is_symlink():
            raise CheckpointError(f"{checkpoints_dir / tag}: a symlink; step folders must be real folders")
        if tag and (checkpoints_dir / tag).is_dir():
            return tag
    steps = step_folders(checkpoints_dir)
    return steps[-1].name if steps else None


def remove_partial_checkpoints(checkpoints_dir: Path) -> None:
    """Delete leftovers of a save that was interrupted (rank 0 only)."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob(TMP_PREFIX + "*"):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def read_training_args(folder: Path) -> dict | None:
    """The flags a step was trained with (TRAINING_ARGS), or None for a step written before they were recorded."""
    path = folder / TRAINING_ARGS
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except ValueError:
        raise CheckpointError(f"{path}: invalid JSON") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: must be a JSON object of flag values")
    return values


def save_training_checkpoint(engine, checkpoints_dir: Path, step: int, client_state: dict, write_inference_files,
                             save_total_limit: int, training_args: dict | None = None) -> Path:
    """Collective: every rank calls it. `write_inference_files(folder)` writes the adapter/projector files
    (it gathers ZeRO-3 parameters itself, so it is collective too). `training_args`: the flags that shaped the
    run (JSON values), recorded so that a resume with other values is refused."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag, tmp_tag = f"step-{step}", f"{TMP_PREFIX}step-{step}"
    # Frozen base weights are not written: they come from the base model, and a 7B LM would add 13 GB per step.
    engine.save_checkpoint(str(checkpoints_dir), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), checkpoints_dir / tmp_tag / f"rng_state_{rank}.pt")
    write_inference_files(checkpoints_dir / tmp_tag)
    if rank == 0 and training_args is not None:
        (checkpoints_dir / tmp_tag / TRAINING_ARGS).write_text(json.dumps(training_args, indent=1, sort_keys=True))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_manifest(checkpoints_dir / tmp_tag)
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


def check_step_folder(folder: Path, world_size: int, zero_stage: int) -> None:
    """Everything a resume reads, checked before DeepSpeed opens a file (rank 0 hashes; the verdict is shared).

    Raises CheckpointError: files that do not match the manifest, a missing DeepSpeed model- or optimizer-state
    file, a missing RNG state of any rank. A folder without a manifest (older mm_moslora) is checked for those files only.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    problem = None
    if rank == 0:
        try:
            if not verify_manifest(folder):
                log.warning("%s has no %s (written by an older mm_moslora): its files are not checked against "
                            "their digests", folder, MANIFEST)
            if not list(folder.glob("*model_states.pt")):
                raise CheckpointError(f"{folder}: no DeepSpeed model-state file (*model_states.pt): the checkpoint "
                                      f"is incomplete")
            if zero_stage > 0 and not list(folder.glob("*optim_states.pt")):
                raise CheckpointError(f"{folder}: no DeepSpeed optimizer-state file (*optim_states.pt) for ZeRO "
                                      f"stage {zero_stage}: the checkpoint is incomplete")
            for r in range(world_size):
                if not (folder / f"rng_state_{r}.pt").is_file():
                    raise CheckpointError(
                        f"{folder}: rng_state_{r}.pt is missing, so resuming would not reproduce the interrupted run "
                        f"(dropout and data order); restore the file, or start over with --resume False")
        except CheckpointError as err:
            problem = err
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        verdict = torch.tensor([problem is not None], dtype=torch.long, device=device)
        dist.all_reduce(verdict)
        if verdict.item() and problem is None:
            raise CheckpointError(f"{folder}: refused (rank 0 reports why)")
    if problem is not None:
        raise problem


def load_training_checkpoint(engine, checkpoints_dir: Path, tag: str) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state.

    Call check_step_folder first. Every file is read weights-only (see the module docstring).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    folder = checkpoints_dir / tag
    rng = load_rng_state(folder / f"rng_state_{rank}.pt")
    try:
        with weights_only_torch_load():
            load_path, client_state = engine.load_checkpoint(
                str(checkpoints_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                load_module_strict=False)  # frozen weights are not saved
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{folder}: a DeepSpeed state file holds more than tensors and plain values; refused "
                              f"(it is never unpickled beyond weights_only=True): {_first_line(err)}") from None
    except (RuntimeError, EOFError, KeyError) as err:  # e.g. a truncated file in a folder without a manifest
        raise CheckpointError(f"{folder}: DeepSpeed could not read the checkpoint: {_first_line(err)}") from None
    if load_path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load the checkpoint")
    set_rng_state(rng)
    return client_state
