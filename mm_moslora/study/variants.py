"""Adapter variants of a study, written `ADAPTER[:OPTION[=VALUE]]...`, and the stage-2 flags each one trains with.

    lora                      plain LoRA at the preset's rank
    moslora                   MoSLoRA, Kaiming-uniform mixer
    moslora:init=orthogonal   mixer initialisation (kaiming, orthogonal, normal, identity, zero)
    moslora:freeze_mixer      M kept at its initial value
    lora:r=80                 another rank; alpha follows it (alpha/r stays the preset's) unless alpha= is given
    lora:params=moslora       LoRA at the rank whose trainable parameters match MoSLoRA's at the preset's rank
                              (the mixer adds r*r per adapted layer), computed from the model's real widths
    moslora:lr=5e-4           a fixed stage-2 learning rate (no sweep for this variant)
Options combine: `moslora:init=identity:freeze_mixer` is LoRA computed through the mixer path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

ADAPTERS = ("lora", "moslora")
MIXER_INITS = ("kaiming", "orthogonal", "normal", "identity", "zero")  # adapters.moslora.MIXER_INITS (no torch here)
OPTION_KEYS = ("init", "freeze_mixer", "r", "alpha", "dropout", "params", "lr")


class VariantError(ValueError):
    """A variant string that cannot be read; the message names it and the reason."""


@dataclass(frozen=True)
class Variant:
    """One adapter configuration of a study. `name` is the string as written (the key in results.json)."""

    name: str
    adapter: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def slug(self) -> str:
        """A folder name for the variant's runs."""
        return re.sub(r"[^A-Za-z0-9.=-]+", "_", self.name)

    @property
    def fixed_lr(self) -> float | None:
        return self.options.get("lr")

    def finetune_flags(self, preset_flags: dict, param_matched_rank=None) -> dict:
        """Stage-2 flags: the preset's, changed by this variant's options (lr aside: the study sets it).

        param_matched_rank(r): the LoRA rank matching MoSLoRA's trainable parameters at rank r (for params=).
        """
        flags = {"adapter": self.adapter}
        r0, alpha0 = int(preset_flags["lora_r"]), float(preset_flags["lora_alpha"])
        r = self.options.get("r", r0)
        if "params" in self.options:
            r = param_matched_rank(r0)
        if r != r0:
            flags["lora_r"] = r
            flags["lora_alpha"] = self.options.get("alpha", alpha0 * r / r0)
        if "alpha" in self.options:
            flags["lora_alpha"] = self.options["alpha"]
        if "dropout" in self.options:
            flags["lora_dropout"] = self.options["dropout"]
        if "init" in self.options:
            flags["mixer_init"] = self.options["init"]
        if self.options.get("freeze_mixer"):
            flags["freeze_mixer"] = True
        return flags


def parse_variant(text: str) -> Variant:
    """`ADAPTER[:OPTION[=VALUE]]...` -> Variant; VariantError naming the variant and the reason otherwise."""
    parts = text.strip().split(":")
    adapter, options = parts[0], {}
    if adapter not in ADAPTERS:
        raise VariantError(f"variant {text!r}: adapter must be one of {ADAPTERS}, got {adapter!r}")
    for part in parts[1:]:
        key, has_value, value = part.partition("=")
        if key not in OPTION_KEYS:
            raise VariantError(f"variant {text!r}: unknown option {key!r}; options are {', '.join(OPTION_KEYS)}")
        if key in options:
            raise VariantError(f"variant {text!r}: option {key!r} given twice")
        if key == "freeze_mixer":
            if has_value and value.lower() not in ("true", "1", "yes"):
                raise VariantError(f"variant {text!r}: freeze_mixer takes no value (write moslora:freeze_mixer)")
            options[key] = True
            continue
        if not value:
            raise VariantError(f"variant {text!r}: option {key!r} needs a value ({key}=...)")
        options[key] = _option_value(text, key, value)
    if adapter == "lora" and ({"init", "freeze_mixer"} & options.keys()):
        raise VariantError(f"variant {text!r}: init and freeze_mixer apply to moslora only (LoRA has no mixer)")
    if "params" in options and ("r" in options or adapter != "lora"):
        raise VariantError(f"variant {text!r}: params=moslora sets LoRA's rank; it takes no r= and applies to lora")
    return Variant(text.strip(), adapter, options)


def _option_value(text: str, key: str, value: str):
    try:
        if key == "r":
            number = int(value)
            if number <= 0:
                raise ValueError
            return number
        if key in ("alpha", "lr"):
            number = float(value)
            if not number > 0:
                raise ValueError
            return number
        if key == "dropout":
            number = float(value)
            if not 0 <= number < 1:
                raise ValueError
            return number
    except ValueError:
        kind = {"r": "a positive integer", "dropout": "a number in [0, 1)"}.get(key, "a positive number")
        raise VariantError(f"variant {text!r}: {key} must be {kind}, got {value!r}") from None
    if key == "init" and value not in MIXER_INITS:
        raise VariantError(f"variant {text!r}: init must be one of {', '.join(MIXER_INITS)}, got {value!r}")
    if key == "params" and value != "moslora":
        raise VariantError(f"variant {text!r}: params can only be 'moslora' (LoRA matching MoSLoRA's count)")
    return value


def parse_variants(texts: list[str]) -> list[Variant]:
    variants = [parse_variant(t) for t in texts]
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VariantError(f"variant {duplicates[0]!r} is listed twice")
    return variants
