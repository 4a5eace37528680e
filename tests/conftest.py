"""Session-wide pytest fixtures (shared by every test file: add new fixtures, keep the others)."""
from __future__ import annotations

from pathlib import Path

import pytest


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
