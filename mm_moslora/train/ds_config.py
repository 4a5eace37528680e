"""Read a DeepSpeed JSON config and fill its "auto" fields from the flags, so no value is set in two places."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


class ConfigError(InputError):
    """A config file that cannot be used; the message names the file and the key."""


def load_deepspeed_config(path: str | Path, *, micro_batch: int, grad_accum: int, world_size: int, bf16: bool,
                          fp16: bool, max_grad_norm: float, hidden_size: int | None) -> dict:
    """The config as a dict with every "auto" filled; raises ConfigError naming the file and the key.

    hidden_size: the LM's, for the ZeRO bucket sizes. None checks everything else and leaves those
    "auto" values in place, so a run can reject a bad file before it spends minutes loading the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed {path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed {path}: the top level must be a JSON object")
    from_flags = {
        ("train_micro_batch_size_per_gpu",): (micro_batch, "--per_device_train_batch_size"),
        ("gradient_accumulation_steps",): (grad_accum, "--gradient_accumulation_steps"),
        ("train_batch_size",): (micro_batch * grad_accum * world_size, "--per_device_train_batch_size x accumulation x GPUs"),
        ("gradient_clipping",): (max_grad_norm, "--max_grad_norm"),
        ("bf16", "enabled"): (bf16, "--bf16"),
        ("fp16", "enabled"): (fp16, "--fp16"),
    }
    for keys, (value, flag) in from_flags.items():
        parent = cfg
        for key in keys[:-1]:
            parent = parent.setdefault(key, {})
            if not isinstance(parent, dict):
                raise ConfigError(f"--deepspeed {path}: key {'.'.join(keys[:-1])!r} must be an object")
        current = parent.get(keys[-1], "auto")
        if current == "auto":
            parent[keys[-1]] = value
        elif current != value:
            raise ConfigError(f"--deepspeed {path}: key {'.'.join(keys)!r} is {current!r} but {flag} gives {value!r}; "
                              f"set it to \"auto\" in the file, or change the flag")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"--deepspeed {path}: key 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--deepspeed {path}: key 'zero_optimization.stage' must be 0-3, got {stage!r}")
    sizes = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}  # the values HF's integration derives
    if hidden_size is not None:
        for key, size in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = size(hidden_size)
    unfilled_sizes = {f"zero_optimization.{key}" for key in sizes} if hidden_size is None else set()
    leftover = [k for k, v in _walk(cfg) if v == "auto" and k not in unfilled_sizes]
    if leftover:
        raise ConfigError(f"--deepspeed {path}: no flag fills the \"auto\" value of key(s) {leftover}")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"--deepspeed {path}: key {'optimizer' if 'optimizer' in cfg else 'scheduler'!r} is not "
                          f"supported; the optimizer and schedule come from --learning_rate/--lr_scheduler_type")
    return cfg


def _walk(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, obj
