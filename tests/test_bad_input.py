"""The bad-input contract (docs/bad_input.md): hostile or broken files, flags, images and requests end in one
`error:` line naming the thing and the reason, a non-zero exit, nothing lost or half-written, and no code run.

Training runs in this process (the tiny model trains a step in well under a second); subprocesses only where
the command line's one-line error and exit status are what is tested.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_moslora.train.args import parse_args
from mm_moslora.train.recipe import run as run_training
from tests.helpers import REPO_ROOT, subprocess_env

FAST = ["--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4", "--report_to", "none"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def train(small_demo_data, tmp_path, capsys):
    """train(*flags) -> (exit status, stderr) of scripts/finetune.py's entry point, run in this process on the
    small demo data into tmp_path/out (unless --output_dir is given)."""
    saved_env = dict(os.environ)  # init_distributed sets RANK, MASTER_PORT, ...: not for later subprocesses

    def go(*flags, data: Path | None = None, image_folder: Path | None = None) -> tuple[int, str]:
        flags = [str(f) for f in flags]
        argv = ["--data_path", str(data or small_demo_data / "finetune.json"),
                "--image_folder", str(image_folder or small_demo_data / "images"), *FAST, *flags]
        if "--output_dir" not in flags:
            argv += ["--output_dir", str(tmp_path / "out")]
        capsys.readouterr()
        code = run_training(parse_args("finetune", argv))
        return code, capsys.readouterr().err

    yield go
    os.environ.clear()
    os.environ.update(saved_env)


def one_error_line(err: str) -> str:
    """The single `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


class RunsCode:
    """Pickles to a call of os.mkdir(path): loading it with full unpickling creates `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def rewrite_manifest(step: Path) -> None:
    """What an attacker who can write the folder does after swapping a file: a matching manifest."""
    if (step / "manifest.json").exists():
        from mm_moslora.train.checkpoint import write_manifest

        write_manifest(step)


def data_with_images(small_demo_data: Path, folder: Path, n: int, corrupt: set[int] = frozenset()) -> Path:
    """`n` image records of the demo set with their images copied into folder/images; records in `corrupt`
    point at an image cut short (it exists, so validation passes; decoding fails). Returns the data file."""
    records = [r for r in json.loads((small_demo_data / "finetune.json").read_text()) if r.get("image")][:n]
    images = folder / "images"
    images.mkdir(parents=True)
    for index, record in enumerate(records):
        data = (small_demo_data / "images" / record["image"]).read_bytes()
        record["image"] = f"img{index}.png"
        (images / record["image"]).write_bytes(data[:60] if index in corrupt else data)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------- code execution from a checkpoint
def test_rng_state_is_stored_weights_only_loadable(train, tmp_path):
    code, err = train("--max_steps", "1")
    assert code == 0, err
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-1" / "rng_state_0.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= state.keys()


@pytest.mark.parametrize("victim", ["rng_state_0.pt", "mp_rank_00_model_states.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(train, tmp_path, victim):
    code, err = train("--max_steps", "2", "--save_steps", "1")
    assert code == 0, err
    step = tmp_path / "out" / "checkpoints" / "step-2"
    marker = tmp_path / "code-ran"
    torch.save({"python": RunsCode(marker), "module": RunsCode(marker)}, step / victim)

    # Swapped alone: the manifest does not match it any more.
    code, err = train("--max_steps", "3")
    assert code == 2 and not marker.exists()
    assert f"{victim} differs from the file written with this checkpoint" in one_error_line(err)
    # Swapped with a rewritten manifest: loaded weights-only, so it is refused instead of run.
    rewrite_manifest(step)
    code, err = train("--max_steps", "3")
    assert not marker.exists(), "the checkpoint ran code"
    assert code == 2 and "weights_only" in one_error_line(err) and str(step) in err


def test_latest_naming_a_folder_outside_is_refused(train, tmp_path):
    code, err = train("--max_steps", "1", "--output_dir", tmp_path / "elsewhere")
    assert code == 0, err
    code, err = train("--max_steps", "1")
    assert code == 0, err
    (tmp_path / "out" / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step-1")
    code, err = train("--max_steps", "2")
    assert code == 2 and "not a step-K folder" in one_error_line(err)
    assert not (tmp_path / "out" / "checkpoints" / "step-2").exists()


@pytest.mark.parametrize("lost, named_without_manifest", [("mp_rank_00_model_states.pt", "model-state file"),
                                                          ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                           "optimizer-state file"),
                                                          ("rng_state_0.pt", "rng_state_0.pt is missing")])
def test_a_step_folder_missing_a_state_file_is_refused(train, tmp_path, lost, named_without_manifest):
    code, err = train("--max_steps", "1")
    assert code == 0, err
    step = tmp_path / "out" / "checkpoints" / "step-1"
    (step / lost).unlink()
    code, err = train("--max_steps", "2")
    assert code == 2 and lost in one_error_line(err)
    # The same without a manifest (an older checkpoint): the files a resume needs are still checked.
    (step / "manifest.json").unlink()
    code, err = train("--max_steps", "2")
    assert code == 2 and named_without_manifest in one_error_line(err)


def test_a_truncated_state_file_is_refused_with_its_name(train, tmp_path):
    code, err = train("--max_steps", "1")
    assert code == 0, err
    optim = tmp_path / "out" / "checkpoints" / "step-1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:100])
    code, err = train("--max_steps", "2")
    assert code == 2 and "zero_pp_rank_0_mp_rank_00_optim_states.pt differs from the file written with this checkpoint: 100 bytes" in one_error_line(err)


def test_older_rng_state_files_still_resume(train, tmp_path):
    """Written before the weights-only format: numpy's tuple inside. Loaded weights-only (numpy arrays allowed)."""
    import random

    import numpy as np

    code, err = train("--max_steps", "1")
    assert code == 0, err
    step = tmp_path / "out" / "checkpoints" / "step-1"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               step / "rng_state_0.pt")
    (step / "manifest.json").unlink()
    code, err = train("--max_steps", "2")
    assert code == 0, err


# ---------------------------------------------------------------- resume with other flags
def test_resume_with_other_model_or_optimisation_flags_is_refused_with_the_list(train, tmp_path):
    code, err = train("--max_steps", "2", "--save_steps", "1")
    assert code == 0, err
    adapter_before = (tmp_path / "out" / "moslora_adapter.safetensors").read_bytes()
    for flags, named in ((["--lora_alpha", "32"], ["--lora_alpha 16.0 -> 32.0"]),
                         (["--learning_rate", "1e-3", "--lora_r", "4"],
                          ["--learning_rate 0.0002 -> 0.001", "--lora_r 8 -> 4"]),
                         (["--adapter", "lora"], ["--adapter moslora -> lora"])):
        code, err = train("--max_steps", "3", *flags)
        line = one_error_line(err)
        assert code == 2 and all(n in line for n in named), line
    assert not (tmp_path / "out" / "checkpoints" / "step-3").exists()
    assert (tmp_path / "out" / "moslora_adapter.safetensors").read_bytes() == adapter_before
    # Longer runs, other save and logging settings: resumed.
    code, err = train("--max_steps", "3", "--save_steps", "5", "--logging_steps", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["steps"] == 3


# ---------------------------------------------------------------- silently wrong training
def test_a_run_whose_every_image_fails_to_decode_fails_and_writes_nothing(train, small_demo_data, tmp_path):
    data = data_with_images(small_demo_data, tmp_path / "bad", 12, corrupt=set(range(12)))
    code, err = train("--max_steps", "3", "--group_by_modality_length", "False", data=data,
                      image_folder=tmp_path / "bad" / "images")
    assert code == 2 and "could be decoded" in one_error_line(err)
    out = tmp_path / "out"
    assert not (out / "train_summary.json").exists() and not (out / "moslora_adapter.safetensors").exists()
    assert not list((out / "checkpoints").glob("step-*"))


def test_steps_whose_every_sample_was_skipped_are_counted_not_logged_as_loss_zero(train, small_demo_data, tmp_path):
    from tests.test_train import scalars

    data = data_with_images(small_demo_data, tmp_path / "some", 8, corrupt={1, 5})
    code, err = train("--max_steps", "8", "--per_device_train_batch_size", "1", "--group_by_modality_length",
                      "False", "--report_to", "tensorboard", "--save_steps", "0", data=data,
                      image_folder=tmp_path / "some" / "images")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["skipped_images"] == 2 and summary["skipped_steps"] == 2 and summary["samples"] == 6
    logged = scalars(tmp_path / "out" / "runs")
    losses = dict(logged["train/loss"])
    assert len(losses) == 6 and all(value > 0.1 for value in losses.values()), losses
    assert [value for _, value in logged["train/skipped_steps"]] == [1, 2]
    assert not set(losses) & {step for step, _ in logged["train/skipped_steps"]}
