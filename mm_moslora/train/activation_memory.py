"""Activation checkpointing chosen by a memory budget (`--activation_memory_budget_gib GIB|auto`).

A checkpointed decoder layer keeps only its inputs in forward and recomputes the rest in backward (a third more
compute for that layer); an un-checkpointed one keeps every tensor its backward needs. So the fastest policy that
fits a budget is the one with the fewest checkpointed layers whose activations fit it.

The activations are measured, not guessed (`measure_activations`): one forward of a real micro-batch with nothing
checkpointed runs under `torch.autograd.graph.saved_tensors_hooks`, whose pack hook notes each tensor autograd
saves - its storage, counted once however many ops share it (parameters and buffers are no activations), and
which part of the model was running: decoder layer i, a tower block, the tower and projector, the LM head, the
rest - and hands autograd a placeholder instead of the tensor, so the probe keeps no memory (its graph is dropped
without a backward; the RNG is restored, so training draws the same dropout masks as without it). Forward
pre-hooks note each layer's inputs: what a checkpointed layer keeps. The bytes a policy keeps at the end of the
forward are then a union of storages, computed for every number of checkpointed layers (`ActivationProfile`).

Which layers: the first ones. Backward reaches them last, after the later layers' saved tensors were freed, so
recomputing one of them (its saved tensors, briefly) rarely raises the peak; the prediction includes it. The
tower's blocks (when gradients flow through the tower) are checkpointed whenever any LM layer is.

Scaling to the largest micro-batch training can see (rows x --model_max_length tokens): the LM's tensors per
token (attention-score-shaped ones, (..., T, T), per token and per T), the LM head's per supervised token (at
most every token), the tower's and projector's per image (at most one per num_image_tokens positions). Not
counted: tensors a custom autograd function keeps outside `save_for_backward` (bitsandbytes' 8-bit matmul keeps
its input so; the adapter saves that same input), backward's gradient buffers and allocator slack: `auto` leaves
AUTO_MARGIN of the card for those, a number is the budget of the counted activations alone.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from ..errors import InputError

log = logging.getLogger(__name__)

GIB = 2 ** 30
# `auto` keeps this share of the card free for what the probe does not count: backward's gradient buffers (the
# largest: the logits' gradient), allocator fragmentation, CUDA and NCCL workspaces.
AUTO_MARGIN = 0.10


# ---------------------------------------------------------------- which layers, and switching them
def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LM's repeated decoder layers, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    found = [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        raise InputError(f"--activation_memory_budget_gib: cannot find the decoder layers of "
                         f"{type(llm).__name__} (no get_decoder().layers, no GradientCheckpointingLayer)")
    return found


def per_layer_checkpointing(layers: list[nn.Module]) -> bool:
    """Whether each layer can be checkpointed on its own (transformers' GradientCheckpointingLayer: a flag per
    layer); other models (remote code with their own loop) only all at once or none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return all(isinstance(layer, GradientCheckpointingLayer) for layer in layers)


def tower_blocks(model: nn.Module) -> list[nn.Module]:
    """The open_clip tower's transformer blocks, or [] when no gradient flows through the tower (then it saves
    nothing for backward and there is nothing to checkpoint)."""
    vision = model.vision
    if not any(p.requires_grad for p in vision.parameters()):
        return []
    return list(vision.visual.transformer.resblocks)


def set_checkpointed_layers(model: nn.Module, layers: list[nn.Module], n_checkpointed: int) -> None:
    """Checkpoint the first `n_checkpointed` decoder layers (non-reentrant; the rest keep their activations), and
    the tower's blocks when any layer is and gradients flow through the tower."""
    if per_layer_checkpointing(layers):
        func = functools.partial(checkpoint, use_reentrant=False)
        for index, layer in enumerate(layers):
            layer._gradient_checkpointing_func = func  # the attribute GradientCheckpointingLayer calls
            layer.gradient_checkpointing = index < n_checkpointed
    elif n_checkpointed == len(layers):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif n_checkpointed == 0:
        model.llm.gradient_checkpointing_disable()
    else:
        raise ValueError(f"{type(layers[0]).__name__} layers are checkpointed all together or not at all")
    if tower_blocks(model):
        model.vision.set_gradient_checkpointing(n_checkpointed > 0)


# ---------------------------------------------------------------- measuring
@dataclasses.dataclass
class Storage:
    """One storage autograd would keep: its bytes, how it scales, which parts saved it or received it as input."""
    nbytes: int
    unit: str                        # "token", "token2" (per token and per T), "supervised" or "image"
    saved_by: set = dataclasses.field(default_factory=set)
    input_of: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class ActivationProfile:
    """What one probe forward saw. Parts: ("layer", i), ("block", j) (tower), "tower" (the rest of the tower and
    the projector), "head" (after the decoder), "other" (embeddings and the rest)."""
    n_layers: int
    n_blocks: int                    # tower blocks that save tensors for backward (0: the tower has no gradient)
    storages: list[Storage]
    rows: int                        # the probe micro-batch: rows x length tokens
    length: int
    supervised: int                  # tokens with a label
    images: int                      # images the tower encoded

    def scale(self, max_rows: int, max_length: int, num_image_tokens: int) -> dict[str, float]:
        """Factors per unit from the probe batch to the largest micro-batch training can see."""
        tokens = max_rows * max_length / (self.rows * self.length)
        max_images = max_rows * (max_length // max(1, num_image_tokens))
        return {"token": tokens, "token2": tokens * max_length / self.length,
                "supervised": max_rows * max_length / max(1, self.supervised),
                "image": max_images / self.images if self.images else 0.0}

    def _sum(self, keep, scale: dict[str, float] | None) -> float:
        return sum(s.nbytes * (scale[s.unit] if scale else 1.0) for s in self.storages if keep(s))

    def retained(self, n_checkpointed: int, scale: dict[str, float] | None = None) -> float:
        """Bytes kept at the end of the forward with the first `n_checkpointed` layers checkpointed."""
        off = self._checkpointed(n_checkpointed)
        return self._sum(lambda s: bool(s.saved_by - off) or bool(s.input_of & off), scale)

    def predicted(self, n_checkpointed: int, scale: dict[str, float] | None = None) -> float:
        """Peak activation bytes: the end of the forward, or the recomputation of the last checkpointed layer in
        backward (later layers' tensors and the head's are freed by then; that layer's saved tensors are back)."""
        at_end = self.retained(n_checkpointed, scale)
        if n_checkpointed == 0:
            return at_end
        off = self._checkpointed(n_checkpointed)  # the tower's blocks too: their saved tensors are not kept
        alive = {"other", "tower", ("layer", n_checkpointed - 1)}
        return max(at_end, self._sum(lambda s: bool(s.saved_by & alive) or bool(s.input_of & off), scale))

    def _checkpointed(self, n_checkpointed: int) -> set:
        off = {("layer", i) for i in range(n_checkpointed)}
        if n_checkpointed:
            off |= {("block", j) for j in range(self.n_blocks)}
        return off


def _unpack_never(_placeholder):
    raise RuntimeError("the activation probe's graph is not for backward")


def measure_activations(model: nn.Module, inputs: dict, layers: list[nn.Module]) -> ActivationProfile:
    """Run `model(**inputs)` once with nothing checkpointed and note what autograd saves (see the module doc).

    The model must be in training mode (dropout as in training). Leaves nothing checkpointed: apply the chosen
    policy afterwards (set_checkpointed_layers).
    """
    if not model.training:
        raise ValueError("measure the activations in training mode")
    blocks = tower_blocks(model)
    set_checkpointed_layers(model, layers, 0)

    ids = inputs["input_ids"]
    rows, length = ids.shape
    labels = inputs.get("labels")
    supervised = int((labels[:, 1:] != -100).sum()) if labels is not None else rows * length
    excluded = {StorageWeakRef(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())}
    records: dict[StorageWeakRef, Storage] = {}
    parts = ["other"]  # a stack: the innermost running part is last
    images = [0]

    def note(tensor: torch.Tensor, part, saved: bool) -> None:
        ref = StorageWeakRef(tensor.untyped_storage())
        if ref in excluded:
            return
        record = records.get(ref)
        if record is None:
            vision = part == "tower" or (isinstance(part, tuple) and part[0] == "block")
            unit = ("image" if vision else "supervised" if part == "head" else
                    "token2" if tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] == length else "token")
            record = records[ref] = Storage(tensor.untyped_storage().nbytes(), unit)
        (record.saved_by if saved else record.input_of).add(part)

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            note(tensor, parts[-1], saved=True)
        return None  # autograd keeps this placeholder, not the tensor

    def enter(part, note_inputs: bool = False):
        def hook(module, args, kwargs):
            parts.append(part)
            if note_inputs:
                for leaf in pytree.tree_leaves((args, kwargs)):
                    if isinstance(leaf, torch.Tensor):
                        note(leaf, part, saved=False)
        return hook

    def leave(module, args, output):
        parts.pop()

    def count_images(module, args):
        images[0] += args[0].shape[0]

    def after_decoder(module, args, output):
        parts[0] = "head"  # what runs after the decoder: the LM head and the loss

    handles = []
    try:
        for index, layer in enumerate(layers):
            handles += [layer.register_forward_pre_hook(enter(("layer", index), True), with_kwargs=True),
                        layer.register_forward_hook(leave)]
        for index, block in enumerate(blocks):
            handles += [block.register_forward_pre_hook(enter(("block", index), True), with_kwargs=True),
                        block.register_forward_hook(leave)]
        for module in (model.vision, model.projector):
            handles += [module.register_forward_pre_hook(enter("tower"), with_kwargs=True),
                        module.register_forward_hook(leave)]
        handles.append(model.vision.register_forward_pre_hook(count_images))
        if hasattr(model.llm, "get_decoder"):
            handles.append(model.llm.get_decoder().register_forward_hook(after_decoder))
        devices = [ids.device] if ids.device.type == "cuda" else []
        # Eager even where the layers are compiled (--torch_compile): the hooks note tensors one by one, and the
        # probe must not leave compiled graphs of its own behind. What it measures is the eager layers' activations.
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.compiler.set_stance("force_eager"), \
                torch.autograd.graph.saved_tensors_hooks(pack, _unpack_never):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ActivationProfile(len(layers), len(blocks), list(records.values()), rows, length, supervised, images[0])


# ---------------------------------------------------------------- choosing
def choose(predicted: list[float], budget: float, per_layer: bool = True) -> int:
    """The fewest checkpointed layers whose predicted bytes fit `budget` (predicted[c]: c checkpointed); all of
    them when nothing fits. Without per-layer checkpointing only none or all."""
    candidates = range(len(predicted)) if per_layer else (0, len(predicted) - 1)
    return next((c for c in candidates if predicted[c] <= budget), len(predicted) - 1)


def gib(n_bytes: float) -> str:
    value = n_bytes / GIB
    return f"{value:.1f} GiB" if value >= 10 else f"{value:.3g} GiB"


def free_for_activations(device: torch.device, capacity_bytes: float | None = None) -> tuple[float, str]:
    """(bytes `auto` may give activations, how that was worked out), read between optimizer steps: the card's
    memory (or `capacity_bytes`, a smaller card to fit), less what is allocated (weights, gradients, optimizer
    states), less AUTO_MARGIN of it."""
    if device.type != "cuda":
        raise InputError("--activation_memory_budget_gib auto: reads the free memory of a GPU; on the CPU give a "
                         "number of GiB")
    torch.cuda.synchronize(device)
    allocated = torch.cuda.memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    reachable = free + torch.cuda.memory_reserved(device)  # other processes' memory stays theirs
    if capacity_bytes is not None:  # as on a smaller card (never more than this one has)
        reachable, total = min(reachable, capacity_bytes), capacity_bytes
    margin = AUTO_MARGIN * total
    budget = reachable - allocated - margin
    return budget, (f"{gib(reachable)} reachable - {gib(allocated)} allocated after the first step - "
                    f"{gib(margin)} margin")


class CheckpointingPlanner:
    """Chooses, applies and reports the checkpointing policy of one run.

    `measure` probes a micro-batch; `start` applies the policy for a number (or, for `auto`, full checkpointing
    for the first optimizer step); `after_first_step` decides `auto` once weights, gradients and optimizer states
    are allocated. Every rank takes the same decision (the largest prediction, the smallest budget): ZeRO-3's
    parameter gathers must happen in the same order everywhere.
    """

    def __init__(self, model: nn.Module, budget_gib: float | str, device: torch.device,
                 capacity_gib: float | None = None):
        self.model, self.device = model, device
        self.budget_gib, self.capacity_gib = budget_gib, capacity_gib
        self.layers = decoder_layers(model.llm)
        self.per_layer = per_layer_checkpointing(self.layers)
        self.predicted: list[float] = []
        self.profile: ActivationProfile | None = None
        self.budget: float | None = None
        self.budget_source = ""
        self.n_checkpointed: int | None = None
        self.pending = False  # `auto` waiting for the first optimizer step
        if not self.per_layer:
            log.warning("%s layers cannot be checkpointed one by one: the budget chooses between all and none",
                        type(self.layers[0]).__name__)

    def measure(self, inputs: dict, max_rows: int, max_length: int, every_batch_alike: bool = False) -> None:
        """Probe `inputs` (one micro-batch) and predict every policy at the largest micro-batch (max_rows x
        max_length tokens; `every_batch_alike`: each micro-batch is this one, as in benchmarks: no scaling)."""
        self.profile = measure_activations(self.model, inputs, self.layers)
        scale = None if every_batch_alike else self.profile.scale(max_rows, max_length, self.model.num_image_tokens)
        self.predicted = [self.profile.predicted(c, scale) for c in range(len(self.layers) + 1)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            values = torch.tensor(self.predicted, dtype=torch.float64, device=self.device)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            self.predicted = values.tolist()
        p = self.profile
        log.info("activations measured on a micro-batch of %d x %d tokens (%d supervised, %d images)%s: %s with no "
                 "layer checkpointed, %s with all %d", p.rows, p.length, p.supervised, p.images,
                 "" if every_batch_alike else f", scaled to the largest, {max_rows} x {max_length} tokens",
                 gib(self.predicted[0]), gib(self.predicted[-1]), len(self.layers))

    def start(self) -> None:
        if self.budget_gib == "auto":
            self.pending = True
            self._apply(len(self.layers))
            log.info("activation checkpointing: every decoder layer for the first optimizer step; then as many as "
                     "the GPU's free memory needs")
        else:
            self._decide(float(self.budget_gib) * GIB, "given")

    def fix(self, n_checkpointed: int) -> None:
        """A fixed policy instead of a budget (benchmarks measure each): the first `n_checkpointed` layers."""
        if not 0 <= n_checkpointed <= len(self.layers):
            raise InputError(f"--checkpoint_layers {n_checkpointed}: the LM has {len(self.layers)} decoder layers")
        if not self.per_layer and n_checkpointed not in (0, len(self.layers)):
            raise InputError(f"--checkpoint_layers {n_checkpointed}: {type(self.layers[0]).__name__} layers are "
                             f"checkpointed all together or not at all")
        self.budget_source = "fixed"
        self._apply(n_checkpointed)
        log.info("%s", self.describe())

    def after_first_step(self) -> None:
        if not self.pending:
            return
        self.pending = False
        capacity = None if self.capacity_gib is None else self.capacity_gib * GIB
        budget, source = free_for_activations(self.device, capacity)
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([budget], dtype=torch.float64, device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
            budget = float(value)
        self._decide(budget, source)

    def _decide(self, budget: float, source: str) -> None:
        self.budget, self.budget_source = budget, source
        self._apply(choose(self.predicted, budget, self.per_layer))
        if self.predicted[self.n_checkpointed] > budget:
            log.warning("activation checkpointing: the activations need %s even with every decoder layer "
                        "checkpointed, more than the budget of %s; checkpointing every layer",
                        gib(self.predicted[-1]), gib(budget))
        log.info("%s", self.describe())

    def _apply(self, n_checkpointed: int) -> None:
        set_checkpointed_layers(self.model, self.layers, n_checkpointed)
        self.n_checkpointed = n_checkpointed

    def describe(self, peak_bytes: float | None = None) -> str:
        """One phrase for logs and the summary line."""
        text = f"activation checkpointing: {self.n_checkpointed} of {len(self.layers)} decoder layers ("
        if self.pending:
            return text + "auto: no optimizer step has run to decide it)"
        if self.budget is None:
            text += "fixed"
        else:
            text += f"budget {gib(self.budget)}" + ("" if self.budget_source == "given" else f" = {self.budget_source}")
        text += f", predicted activations {gib(self.predicted[self.n_checkpointed])}"
        return text + (f"; measured peak {gib(peak_bytes)})" if peak_bytes is not None else ")")

    def fields(self) -> dict:
        """For train_summary.json."""
        return {"checkpointed_layers": self.n_checkpointed, "decoder_layers": len(self.layers),
                "budget_gib": None if self.budget is None else round(self.budget / GIB, 4),
                "budget_flag": self.budget_gib, "predicted_activations_gib":
                    None if self.n_checkpointed is None or not self.predicted
                    else round(self.predicted[self.n_checkpointed] / GIB, 4),
                "predicted_gib_by_checkpointed_layers": [round(p / GIB, 4) for p in self.predicted]}


def first_probe_batch(batches, max_tries: int = 8):
    """The first of `batches` (collated micro-batches) that holds a sample (all of a batch's images may fail)."""
    for index, batch in enumerate(batches):
        if "input_ids" in batch:
            return batch
        if index + 1 >= max_tries:
            break
    raise InputError("--activation_memory_budget_gib: no micro-batch among the first ones could be loaded to "
                     "measure the activations")
