"""Session-wide pytest fixtures (shared by every test file: add new fixtures, keep the others)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (ours in adapters/dropout_kernels.py) run in Triton's CPU interpreter on a machine without a
    # GPU. The variable is read when Triton decorates its kernels, so it must be set before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
