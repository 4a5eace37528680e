"""Session-wide pytest fixtures (shared by every test file: add new fixtures, keep the others)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (ours in adapters/dropout_kernels.py) run in Triton's CPU interpreter on a machine without a
    # GPU. The variable is read when Triton decorates its kernels, so it must be set before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# scripts/run_tests.sh runs the suite on every core with pytest-xdist, each module whole on one worker (its module
# fixtures are built once) in collection order. These modules take a minute or more on 2 cores: they start first,
# so that the workers finish together instead of one running a long module alone at the end.
LONGEST_MODULES_FIRST = ("test_compare_adapters.py", "test_demo.py", "test_train.py", "test_bad_input.py",
                         "test_lmms_eval_cli.py")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker (its collection is the schedule); one process: file order
        rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is faster than two, and immune to other processes on a small machine.
    (Subprocesses get the same through tests.helpers.subprocess_env.)"""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_checkpoint_files(tmp_path_factory):
    """(checkpoint folder, 4 PIL images): a tiny MoSLoRA checkpoint with non-trivial weights (tests.helpers)."""
    from mm_moslora.data.images import load_image
    from tests.helpers import make_images, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_ckpt")
    return make_tiny_checkpoint(root / "ckpt"), [load_image(p) for p in make_images(root / "images", 4)]


@pytest.fixture(scope="session")
def small_demo_data(tmp_path_factory) -> Path:
    """A small built-in demo data set, generated once per session (about a second).

    Layout: DIR/pretrain.json (200 captions), DIR/finetune.json (200 visual-QA records, a few text-only),
    DIR/images/ (the --image_folder), DIR/eval/. Treat it as read-only: tests that need broken data copy it.
    """
    from mm_moslora.demo_data import generate

    out = tmp_path_factory.mktemp("small_demo_data")
    generate(out, seed=0, n_train=200, n_pretrain=200, n_eval=40, progress=False)
    return out


@pytest.fixture
def recipe_in_process(capsys, caplog):
    """recipe_in_process(stage, argv) -> CompletedProcess: what `python scripts/<stage>.py ARGV` does (its whole
    body: parse_args, then mm_moslora.train.recipe.run, whose status the script exits with), run in this process.
    A script start costs seconds of imports; tests that need the real process (a kill, the exit status, the
    interpreter's own output) start one. stdout: what the run printed; stderr: what it printed there, then its
    log records (a subprocess writes them to stderr too)."""
    from mm_moslora.data.images import allow_images_outside_folder
    from mm_moslora.train.args import parse_args
    from mm_moslora.train.recipe import run

    def go(stage: str, argv: list) -> subprocess.CompletedProcess:
        from deepspeed.utils import logger as deepspeed_logger

        argv = [str(a) for a in argv]
        saved_env = dict(os.environ)  # init_distributed sets RANK, MASTER_PORT, ...: not for later subprocesses
        # DeepSpeed's logger holds the sys.stdout of its import (maybe an earlier test's capture, closed since).
        # (Assigned, not setStream(): that flushes the old stream, which may be closed.)
        streams = [(h, h.stream) for h in deepspeed_logger.handlers if type(h) is logging.StreamHandler]
        for handler, _ in streams:
            handler.stream = sys.stdout
        capsys.readouterr()
        caplog.clear()
        try:
            with caplog.at_level(logging.INFO, logger="mm_moslora"):
                code = run(parse_args(stage, argv))
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            allow_images_outside_folder(False)  # a run sets this process-wide rule from its flag: the default again
            for handler, stream in streams:
                handler.stream = sys.__stdout__ if getattr(stream, "closed", False) else stream
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([f"scripts/{stage}.py", *argv], code, out, err + caplog.text)

    return go
