"""Adapters that plug mm_moslora checkpoints into other frameworks.

- `lmms_eval`: the lmms-eval model `mm_moslora` (`lmms-eval --model mm_moslora --model_args pretrained=CKPT`),
  registered through the entry point `lmms_eval_manifest` below.

Importing this package needs none of those frameworks: each submodule imports its own.
"""
from __future__ import annotations

LMMS_EVAL_MODEL_NAME = "mm_moslora"


def lmms_eval_manifest():
    """The object of mm_moslora's entry point in the group `lmms_eval.models` (see pyproject.toml).

    lmms-eval calls it while `lmms_eval.models` is being imported, to learn the class behind `--model
    mm_moslora`. It lives here rather than in `integrations/lmms_eval.py` so that the call imports nothing
    heavy (torch, the model code): lmms-eval loads every entry point whenever `lmms_eval.models` is imported,
    whichever model is asked for. The class itself is imported only when `--model mm_moslora` is used.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_NAME,
                         simple_class_path="mm_moslora.integrations.lmms_eval.MMMoSLoRA")
