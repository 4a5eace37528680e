"""--activation_memory_budget_gib (mm_moslora/train/activation_memory.py): the probe counts exactly what a real
forward keeps, the fewest checkpointed layers that fit are chosen and really recomputed, and no policy changes the
losses or the gradients."""
from __future__ import annotations

import json

import pytest
import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from mm_moslora.adapters import AdapterConfig, inject_adapters
from mm_moslora.errors import InputError
from mm_moslora.model.build import build_model
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID
from mm_moslora.train import activation_memory, recipe
from mm_moslora.train.activation_memory import (GIB, CheckpointingPlanner, choose, decoder_layers,
                                                free_for_activations, measure_activations, set_checkpointed_layers)
from mm_moslora.train.args import parse_args
from mm_moslora.train.resume import resume_differences


def tiny_model(vision_adapter: bool = True):
    """The tiny model as stage 2 trains it: MoSLoRA (dropout 0.1) on the LM, optionally on the tower too."""
    torch.manual_seed(0)
    model, _ = build_model("tiny")
    model.llm.requires_grad_(False)
    config = AdapterConfig(adapter="moslora", r=4, alpha=8, dropout=0.1)
    inject_adapters(model.llm, config)
    if vision_adapter:
        model.vision.add_adapters(config)
    for module in model.modules():  # non-zero B: every adapter's gradient path is exercised
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    return model.train()


def batch(model, rows: int = 3, text: int = 30, seed: int = 0) -> dict:
    """rows samples of 1 + image + `text` tokens, the last row padded by 7, labels on the second half of the text."""
    gen = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens
    ids = torch.randint(5, 700, (rows, 1 + n_img + text), generator=gen)
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n_img + text // 2] = -100
    mask = torch.ones_like(ids)
    mask[-1, -7:] = 0
    labels[-1, -7:] = -100
    size = model.vision.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(rows, 3, size, size, generator=gen)}


class KeptStorages(TorchDispatchMode):
    """Every storage an op creates while active; `kept()`: the bytes of those still alive (a real forward's
    activations, measured without autograd's hooks). Parameters, buffers and the given tensors do not count."""

    def __init__(self, model, *given: torch.Tensor):
        super().__init__()
        self.known = {StorageWeakRef(t.untyped_storage()) for t in (*model.parameters(), *model.buffers(), *given)}
        self.created: dict[StorageWeakRef, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.known and ref not in self.created:
                    self.created[ref] = t.untyped_storage().nbytes()
        return out

    def kept(self, *ignored: torch.Tensor) -> int:
        skip = {StorageWeakRef(t.untyped_storage()) for t in ignored}
        return sum(n for ref, n in self.created.items() if not ref.expired() and ref not in skip)


@pytest.fixture(scope="module")
def probed():
    model = tiny_model()
    inputs = batch(model)
    layers = decoder_layers(model.llm)
    tracker = KeptStorages(model, *inputs.values())
    with tracker:
        profile = measure_activations(model, inputs, layers)
    assert tracker.kept() == 0  # the probe keeps nothing
    return model, inputs, layers, profile


def test_the_probe_counts_exactly_what_a_real_forward_keeps_for_every_policy(probed):
    model, inputs, layers, profile = probed
    assert profile.n_layers == 4 and profile.n_blocks == 2 and profile.images == 3
    assert profile.supervised == int((inputs["labels"][:, 1:] != -100).sum())
    kept = []
    for n_checkpointed in range(len(layers) + 1):
        set_checkpointed_layers(model, layers, n_checkpointed)
        tracker = KeptStorages(model, *inputs.values())
        with tracker:
            loss = model(**inputs).loss
        kept.append(tracker.kept(loss))
        assert kept[-1] == profile.retained(n_checkpointed), n_checkpointed
        del loss
    assert kept == sorted(kept, reverse=True) and kept[0] > 4 * kept[-1]  # checkpointing frees memory
    # The prediction adds the recomputation of the last checkpointed layer where that is the peak: with every
    # layer checkpointed, layer 3's saved tensors come back while all inputs are still kept.
    assert profile.predicted(0) == kept[0]
    assert profile.predicted(4) > kept[4]
    assert profile.predicted(4) - kept[4] <= kept[3] - kept[4] + (kept[0] - kept[1])


def test_the_fewest_checkpointed_layers_that_fit_are_chosen(probed, caplog):
    *_, profile = probed
    predicted = [profile.predicted(c) for c in range(profile.n_layers + 1)]
    for budget in sorted({*predicted, *(p - 1 for p in predicted), *(p + 1 for p in predicted)}):
        chosen = choose(predicted, budget)
        if predicted[chosen] <= budget:
            assert all(p > budget for p in predicted[:chosen])  # one layer fewer would not fit
        else:
            assert chosen == 4 and min(predicted) > budget  # nothing fits: every layer
    assert choose(predicted, predicted[2], per_layer=False) == 4  # all or none for layers without their own flag
    assert choose(predicted, predicted[0], per_layer=False) == 0


def recomputations(model, layers, n_checkpointed: int, inputs) -> tuple[list[int], list[int]]:
    """How often each decoder layer's MLP and each tower block's MLP runs in one forward and backward."""
    set_checkpointed_layers(model, layers, n_checkpointed)
    blocks = list(model.vision.visual.transformer.resblocks)
    counts = {id(m): 0 for m in [*(l.mlp for l in layers), *(b.mlp for b in blocks)]}
    # Pre-hooks: a recomputation stops as soon as the saved tensors are back, before a module's forward returns.
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: counts.__setitem__(id(m), counts[id(m)] + 1) if id(m) in counts else None)]
    try:
        model(**inputs).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return [counts[id(l.mlp)] for l in layers], [counts[id(b.mlp)] for b in blocks]


def test_the_chosen_layers_and_only_they_are_recomputed_in_backward(probed):
    model, inputs, layers, _ = probed
    assert recomputations(model, layers, 0, inputs) == ([1, 1, 1, 1], [1, 1])
    assert recomputations(model, layers, 2, inputs) == ([2, 2, 1, 1], [2, 2])  # the tower's blocks too
    assert recomputations(model, layers, 4, inputs) == ([2, 2, 2, 2], [2, 2])


def loss_and_gradients(model, inputs, seed: int = 1) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_losses_and_gradients_do_not_depend_on_the_policy_or_the_probe(probed):
    model, inputs, layers, _ = probed
    set_checkpointed_layers(model, layers, 0)
    reference_loss, reference = loss_and_gradients(model, inputs)
    assert len(reference) > 40 and all(g.abs().sum() > 0 for g in reference.values())
    for n_checkpointed in (1, 3, 4):
        set_checkpointed_layers(model, layers, n_checkpointed)
        loss, grads = loss_and_gradients(model, inputs)
        assert torch.equal(loss, reference_loss)
        assert all(torch.equal(grads[n], reference[n]) for n in reference), n_checkpointed
    torch.manual_seed(1)  # the probe draws dropout masks but gives the RNG back: training draws the same ones
    measure_activations(model, inputs, layers)
    loss = model(**inputs).loss
    assert torch.equal(loss.detach(), reference_loss)


def test_predictions_scale_to_a_larger_micro_batch():
    """Measured on 2 rows of 80 text tokens, predicted for 4 rows of the length 2 x 80 text tokens give: what a
    real forward of such a batch keeps, to within the few fixed-size tensors (adapter weights combined) that do not
    grow with the batch."""
    model = tiny_model()
    layers = decoder_layers(model.llm)
    small, large = batch(model, rows=2, text=80), batch(model, rows=4, text=80 + 1 + model.num_image_tokens)
    profile = measure_activations(model, small, layers)
    large_length = large["input_ids"].shape[1]
    scale = profile.scale(4, large_length, model.num_image_tokens)
    assert scale["image"] == 4 * (large_length // model.num_image_tokens) / 2  # at most one image per 64 positions
    scale["image"] = 2.0  # the large batch holds 4 images, not the 12 a row of 2 x 64 + ... could
    scale["supervised"] = (large["labels"][:, 1:] != -100).sum().item() / profile.supervised
    for n_checkpointed in (0, 2, 4):
        set_checkpointed_layers(model, layers, n_checkpointed)
        tracker = KeptStorages(model, *large.values())
        with tracker:
            loss = model(**large).loss
        kept = tracker.kept(loss)
        del loss
        assert kept <= profile.retained(n_checkpointed, scale) <= 1.05 * kept, n_checkpointed


# ---------------------------------------------------------------- auto: the GPU's memory
def fake_gpu(monkeypatch, free: int, total: int, reserved: int, allocated: int) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_auto_gives_activations_what_the_gpu_has_free_less_a_margin(monkeypatch):
    with pytest.raises(InputError, match="on the CPU give a number"):
        free_for_activations(torch.device("cpu"))
    fake_gpu(monkeypatch, free=50 * GIB, total=80 * GIB, reserved=24 * GIB, allocated=20 * GIB)
    budget, how = free_for_activations(torch.device("cuda", 0))
    # 50 free + 4 reserved by this process but not in use; 10 % of the card left for gradients and slack
    assert budget == pytest.approx(54 * GIB - 8 * GIB) and "margin" in how
    budget, _ = free_for_activations(torch.device("cuda", 0), capacity_bytes=40 * GIB)  # as on a 40 GiB card
    assert budget == pytest.approx(40 * GIB - 20 * GIB - 4 * GIB)


def test_auto_runs_the_first_step_fully_checkpointed_then_chooses(probed, monkeypatch):
    model, inputs, layers, profile = probed
    planner = CheckpointingPlanner(model, "auto", torch.device("cpu"))
    planner.measure(inputs, max_rows=3, max_length=inputs["input_ids"].shape[1])
    planner.start()
    assert planner.pending and planner.n_checkpointed == 4
    assert [l.gradient_checkpointing for l in layers] == [True] * 4
    assert "no optimizer step has run" in planner.describe()
    target = planner.predicted[1]
    monkeypatch.setattr(activation_memory, "free_for_activations", lambda device, capacity=None: (target, "fake"))
    planner.after_first_step()
    assert not planner.pending and planner.n_checkpointed == 1
    assert [l.gradient_checkpointing for l in layers] == [True, False, False, False]
    assert planner.describe().startswith("activation checkpointing: 1 of 4 decoder layers (budget ")


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "lots", ""])
def test_a_bad_budget_is_a_one_line_flag_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args("finetune", ["--activation_memory_budget_gib", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --activation_memory_budget_gib: expected a positive number of GiB or auto" in err


def test_budget_flag_interplay_with_gradient_checkpointing_and_resume(capsys):
    assert parse_args("finetune", ["--activation_memory_budget_gib", "AUTO"]).activation_memory_budget_gib == "auto"
    args = parse_args("finetune", ["--activation_memory_budget_gib", "40", "--gradient_checkpointing", "True"])
    assert args.activation_memory_budget_gib == 40.0 and args.gradient_checkpointing is True  # the budget decides
    assert parse_args("finetune", []).gradient_checkpointing is False
    with pytest.raises(SystemExit):
        parse_args("finetune", ["--activation_memory_budget_gib", "40", "--gradient_checkpointing", "False"])
    assert "contradict each other" in capsys.readouterr().err
    # Speed and memory only, not the maths: a resume may change it.
    assert resume_differences({"activation_memory_budget_gib": None}, {"activation_memory_budget_gib": 12.5}, {}) == []


# ---------------------------------------------------------------- training runs
FAST = ["--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4", "--report_to", "none",
        "--model_max_length", "256", "--save_steps", "0"]


@pytest.fixture
def train(small_demo_data, tmp_path, capsys):
    """train(*flags) -> (exit status, stdout, stderr) of finetune.py's entry point in this process."""
    import os

    saved_env = dict(os.environ)

    def go(*flags):
        argv = ["--data_path", str(small_demo_data / "finetune.json"), "--image_folder",
                str(small_demo_data / "images"), "--output_dir", str(tmp_path / "out"), *FAST, *map(str, flags)]
        capsys.readouterr()
        code = recipe.run(parse_args("finetune", argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield go
    os.environ.clear()
    os.environ.update(saved_env)


def summary_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("[mm_moslora] finetune done")]
    assert len(lines) == 1, out
    return lines[0]


def test_a_run_with_a_budget_says_its_choice_and_resumes_with_another(train, tmp_path):
    code, out, _ = train("--activation_memory_budget_gib", "0.02", "--vision_adapter", "moslora", "--max_steps", "2")
    assert code == 0
    line = summary_line(out)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())["activation_checkpointing"]
    chosen, predicted = summary["checkpointed_layers"], summary["predicted_gib_by_checkpointed_layers"]
    assert 0 < chosen < 4 and predicted[chosen] <= 0.02 < predicted[chosen - 1]  # this data: a mixed policy
    assert f"activation checkpointing: {chosen} of 4 decoder layers (budget 0.02 GiB, predicted activations" in line
    code, out, _ = train("--activation_memory_budget_gib", "1", "--vision_adapter", "moslora", "--max_steps", "3")
    assert code == 0 and "3 steps" in summary_line(out)  # resumed with another budget
    assert "activation checkpointing: 0 of 4 decoder layers (budget 1 GiB" in summary_line(out)


def test_auto_on_the_cpu_is_refused_in_one_line(train, tmp_path):
    code, _, err = train("--activation_memory_budget_gib", "auto", "--max_steps", "1")
    assert code == 2 and "Traceback" not in err
    assert [l for l in err.splitlines() if l.startswith("error:")] == [
        "error: --activation_memory_budget_gib auto: reads the free memory of a GPU; on the CPU give a number of GiB"]
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())
