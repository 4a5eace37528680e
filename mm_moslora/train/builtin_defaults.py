"""What a flag-less run gets: the built-in demo data and, for stage 2 of the tiny model, the stage-1 projector that
a flag-less stage 1 wrote. Kept out of the recipe, which only ever reads the flags it is given.

    python scripts/pretrain.py && python scripts/finetune.py      # both stages of the tiny model on the demo data
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import PROJECTOR_FILE
from .args import DEFAULT_DEMO_DIR, DEFAULT_OUTPUT

log = logging.getLogger("mm_moslora.train")


def apply_builtin_defaults(args: argparse.Namespace, rank: int) -> None:
    """Fill in --data_path/--image_folder and --pretrain_mm_mlp_adapter where the user gave none (collective: rank 0
    writes the demo data once while the others wait). Each default is logged, so none is silent."""
    if args.data_path is None and args.data_mixture is None:
        from ..demo_data import generate

        if rank == 0:
            generate(DEFAULT_DEMO_DIR)
        if dist.is_initialized():
            dist.barrier()
        args.data_path = f"{DEFAULT_DEMO_DIR}/{'pretrain' if args.stage == 'pretrain' else 'finetune'}.json"
        args.image_folder = args.image_folder or f"{DEFAULT_DEMO_DIR}/images"
        log.info("no --data_path: training on the built-in demo data %s", args.data_path)
    stage1 = Path(DEFAULT_OUTPUT["pretrain"])
    if (args.stage == "finetune" and args.pretrain_mm_mlp_adapter is None and args.model_name_or_path == "tiny"
            and (stage1 / PROJECTOR_FILE).exists()):
        args.pretrain_mm_mlp_adapter = str(stage1)
        log.info("no --pretrain_mm_mlp_adapter: using the stage-1 projector of the tiny model in %s", stage1)
