"""The training recipe end to end on the tiny model (CPU): exact resume after SIGKILL, crash-safe checkpoints,
ZeRO-3 on two ranks, command-line errors, and the outputs of a run.

Starting a script costs seconds of imports, so the real command (a subprocess, one torch thread) runs where the
process itself is tested: a run killed with SIGKILL, two ranks through the `deepspeed` launcher, exit statuses and
error output; training runs that only need the recipe run the scripts' entry point in this process
(recipe_in_process in tests/conftest.py), some meanwhile; the rest call mm_moslora.train's functions directly.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_moslora.train import checkpoint
from mm_moslora.train.args import parse_args
from mm_moslora.train.ds_config import ConfigError, load_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CONFIGS = REPO / "deepspeed_configs"
DEEPSPEED_LAUNCHER = Path(sys.executable).parent / "deepspeed"
TIMEOUT = 420
# Small and fast: the tiny model, a rank-8 adapter, 4 samples per rank and step, TensorBoard only where tested.
FAST = ["--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4", "--report_to", "none"]
SUMMARY = "[mm_moslora] finetune done:"
INFERENCE_FILES = ("moslora_adapter.safetensors", "mm_projector.safetensors")
VISION_ADAPTER = ["--vision_adapter", "moslora", "--vision_lora_r", "4", "--vision_lora_dropout", "0.1"]
VISION_ADAPTER_FILE = "vision_adapter/moslora_adapter.safetensors"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one torch thread per subprocess


def data_flags(data: Path, data_file: str | Path = "finetune.json") -> list[str]:
    return ["--data_path", str(data / data_file), "--image_folder", str(data / "images")]


def start(cmd: list, cwd: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in the background; its stdout/stderr go to files CWD/NAME.out and .err (a pipe could fill up)."""
    logs = open(cwd / f"{name}.out", "w"), open(cwd / f"{name}.err", "w")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=logs[0], stderr=logs[1], env={**ENV, **(env or {})})
    proc.log_files = logs
    return proc


def finish(proc: subprocess.Popen, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Wait for a `start`ed command; its output as a CompletedProcess."""
    proc.wait(timeout=TIMEOUT)
    for log in proc.log_files:
        log.close()
    stdout, stderr = (Path(log.name).read_text() for log in proc.log_files)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}\n--- stdout\n{stdout[-3000:]}\n"
                             f"--- stderr\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(cmd: list, cwd: Path, expect_ok: bool = True, name: str = "run", env: dict | None = None,
        ) -> subprocess.CompletedProcess:
    return finish(start(cmd, cwd, name, env), expect_ok)


def finetune_cmd(*args) -> list:
    return [sys.executable, SCRIPTS / "finetune.py", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_records(data: Path, n: int) -> list[dict]:
    """The first `n` records of the demo finetune set that have an image."""
    records = json.loads((data / "finetune.json").read_text())
    return [r for r in records if r.get("image")][:n]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars under `run_dir`: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------- 1. exact resume
def kill_after_first_checkpoint(victim: subprocess.Popen, output_dir: Path) -> None:
    """SIGKILL `victim` as soon as its first checkpoint is complete (`latest` is written last)."""
    latest = output_dir / "checkpoints" / "latest"
    deadline = time.time() + TIMEOUT
    while not latest.is_file():
        assert victim.poll() is None, (f"the run ended (exit {victim.returncode}) before its first checkpoint: "
                                       f"{Path(victim.log_files[1].name).read_text()[-3000:]}")
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    assert finish(victim, expect_ok=False).returncode == -signal.SIGKILL


def test_run_killed_after_a_checkpoint_resumes_to_the_same_weights(small_demo_data, tmp_path, recipe_in_process):
    # With adapters on the vision tower too (dropout on both sides): they resume exactly like the LM's.
    flags = [*data_flags(small_demo_data), *FAST, "--max_steps", "6", "--save_steps", "2", "--lora_dropout", "0.1",
             "--report_to", "tensorboard", *VISION_ADAPTER]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    # The killed run is a real process (SIGKILL); resuming it and the uninterrupted reference run the script's
    # entry point in this process (the same code, without the start-up).
    kill_after_first_checkpoint(start(finetune_cmd(*flags, "--output_dir", resumed_dir), tmp_path, "victim"),
                                resumed_dir)
    assert not (resumed_dir / "train_summary.json").exists()
    (resumed_dir / "checkpoints" / "tmp-step-99").mkdir()  # as a save killed midway leaves it

    resumed = recipe_in_process("finetune", [*flags, "--output_dir", resumed_dir])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed from \S+step-[24] \(step [24]\)", resumed.stderr), resumed.stderr[-3000:]
    assert not (resumed_dir / "checkpoints" / "tmp-step-99").exists()
    reference = recipe_in_process("finetune", [*flags, "--output_dir", reference_dir])
    assert reference.returncode == 0 and "resumed from" not in reference.stderr, reference.stderr[-3000:]

    for name in (*INFERENCE_FILES, VISION_ADAPTER_FILE):
        expected, got = load_file(str(reference_dir / name)), load_file(str(resumed_dir / name))
        assert expected.keys() == got.keys() and expected
        for key in expected:
            assert (expected[key] - got[key]).abs().max() <= 1e-6, f"{name}: {key} differs after resuming"
    for name in (INFERENCE_FILES[0], VISION_ADAPTER_FILE):
        adapter = load_file(str(reference_dir / name))
        assert all(t.abs().sum() > 0 for k, t in adapter.items() if k.endswith("lora_B"))  # B starts at 0: it trained
    summaries = [json.loads((d / "train_summary.json").read_text()) for d in (reference_dir, resumed_dir)]
    for key in ("steps", "samples", "final_loss"):
        assert summaries[0][key] == summaries[1][key], key
    # One loss curve: the killed run's logs up to its checkpoint, then the resumed run's (redone steps purged).
    expected, got = (scalars(d / "runs")["train/loss"] for d in (reference_dir, resumed_dir))
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) <= 1e-6, (expected, got)


# ---------------------------------------------------------------- 2. crash-safe checkpoints
class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes, in miniature: a state file in DIR/TAG/."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, **options):
        assert not save_latest  # `latest` is ours, written only once the step folder is complete
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, folder / "mp_rank_00_model_states.pt")


def write_inference_files(folder: Path) -> None:
    (folder / "moslora_adapter.safetensors").write_bytes(b"adapter")
    (folder / "mm_projector.safetensors").write_bytes(b"projector")


def test_a_crash_while_saving_leaves_latest_on_the_previous_checkpoint(tmp_path):
    ckpts, engine = tmp_path / "checkpoints", FakeEngine()
    ckpts.mkdir()
    checkpoint.save_training_checkpoint(engine, ckpts, 2, {"global_step": 2}, write_inference_files, 2)
    assert checkpoint.latest_checkpoint(ckpts) == "step-2"
    complete = sorted(p.name for p in (ckpts / "step-2").iterdir())
    assert complete == ["manifest.json", "mm_projector.safetensors", "moslora_adapter.safetensors",
                        "mp_rank_00_model_states.pt", "rng_state_0.pt"]

    def crash_midway(folder: Path) -> None:
        (folder / "moslora_adapter.safetensors").write_bytes(b"adap")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_training_checkpoint(engine, ckpts, 4, {"global_step": 4}, crash_midway, 2)
    assert (ckpts / "latest").read_text().strip() == "step-2"
    assert checkpoint.latest_checkpoint(ckpts) == "step-2"
    assert not (ckpts / "step-4").exists() and (ckpts / "tmp-step-4").is_dir()
    assert sorted(p.name for p in (ckpts / "step-2").iterdir()) == complete

    checkpoint.remove_partial_checkpoints(ckpts)  # what the next start does first
    assert not (ckpts / "tmp-step-4").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2"]

    # Saving goes on normally; save_total_limit=2 keeps the two newest.
    for step in (4, 6):
        checkpoint.save_training_checkpoint(engine, ckpts, step, {"global_step": step}, write_inference_files, 2)
    assert [p.name for p in checkpoint.step_folders(ckpts)] == ["step-4", "step-6"]
    assert checkpoint.latest_checkpoint(ckpts) == "step-6"
    assert torch.load(ckpts / "step-6" / "mp_rank_00_model_states.pt") == {"global_step": 6}


def test_latest_falls_back_to_the_newest_complete_step(tmp_path):
    ckpts, engine = tmp_path / "checkpoints", FakeEngine()
    ckpts.mkdir()
    assert checkpoint.latest_checkpoint(ckpts) is None
    for step in (2, 4):
        checkpoint.save_training_checkpoint(engine, ckpts, step, {}, write_inference_files, 0)
    (ckpts / "latest").write_text("step-8")  # names a folder that is gone
    assert checkpoint.latest_checkpoint(ckpts) == "step-4"
    (ckpts / "latest").unlink()  # killed between the rename and the write of `latest`
    assert checkpoint.latest_checkpoint(ckpts) == "step-4"
    # A newer step folder left by an earlier run is pruned before the one just written.
    (ckpts / "step-10").mkdir()
    checkpoint.save_training_checkpoint(engine, ckpts, 6, {}, write_inference_files, 1)
    assert [p.name for p in checkpoint.step_folders(ckpts)] == ["step-6"]
    assert checkpoint.latest_checkpoint(ckpts) == "step-6"


# ---------------------------------------------------------------- 3. ZeRO on two ranks
def fresh_trainable_shapes(lora_r: int) -> tuple[dict, dict]:
    """{name: shape} of the adapter and of the projector of a freshly built tiny model, single process."""
    from mm_moslora.adapters import AdapterConfig, adapter_state_dict, inject_adapters
    from mm_moslora.model.build import build_model

    model, _ = build_model("tiny")
    inject_adapters(model.llm, AdapterConfig(r=lora_r, alpha=16, base_model="tiny"))
    adapter = {k: tuple(v.shape) for k, v in adapter_state_dict(model.llm).items()}
    return adapter, {k: tuple(v.shape) for k, v in model.projector.state_dict().items()}


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (or none: CPU ranks)")
@pytest.mark.parametrize("config, packing", [("zero3", True), ("zero2", False)])
def test_two_ranks_save_the_full_gathered_weights(config, packing, small_demo_data, tmp_path):
    """ZeRO-3 runs with --packing (one packed row of 384 tokens per rank and step), ZeRO-2 with padded batches and
    a 4-bit base LM (QLoRA on two ranks; the CPU has bitsandbytes kernels)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mm_moslora.data.conversation import tokenize_conversation
    from mm_moslora.data.images import ImageProcessor, load_image
    from mm_moslora.checkpoint import load_checkpoint
    from mm_moslora.model.quantize import count_quantized

    out = tmp_path / "out"
    proc = run([DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", free_port(), SCRIPTS / "finetune.py",
                "--deepspeed", CONFIGS / f"{config}.json", *data_flags(small_demo_data), *FAST, *VISION_ADAPTER,
                *(["--packing", "True", "--per_device_train_batch_size", "1", "--model_max_length", "384"]
                  if packing else []),
                *(["--bits", "4"] if config == "zero2" else []),
                "--activation_memory_budget_gib", "0.01",  # a mixed policy (some layers checkpointed), same on both ranks
                "--max_steps", "2", "--save_steps", "0", "--output_dir", out], cwd=tmp_path)
    assert f"{SUMMARY} 2 steps" in proc.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["packing"] is packing and summary["world_size"] == 2
    if packing:  # several samples in each rank's packed row
        assert summary["samples"] > 2 * 2 * 2
    policy = summary["activation_checkpointing"]  # the fewest checkpointed layers that fit (all when none does)
    fits = [c for c, gib in enumerate(policy["predicted_gib_by_checkpointed_layers"]) if gib <= 0.01]
    assert policy["checkpointed_layers"] == (fits[0] if fits else 4)
    assert f"activation checkpointing: {policy['checkpointed_layers']} of 4 decoder layers" in proc.stdout
    assert 0 < policy["checkpointed_layers"] < 4 or not packing  # ZeRO-3 + packing: a mixed policy

    adapter, projector = (load_file(str(out / name)) for name in INFERENCE_FILES)
    expected_adapter, expected_projector = fresh_trainable_shapes(lora_r=8)
    assert {k: tuple(v.shape) for k, v in adapter.items()} == expected_adapter
    assert {k: tuple(v.shape) for k, v in projector.items()} == expected_projector
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in [*adapter.values(), *projector.values()])
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if k.endswith("lora_B"))  # trained, not the zero init

    # The same tensors as DeepSpeed's own consolidation of the (partitioned) checkpoint.
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step-2")
    vision_adapter = load_file(str(out / VISION_ADAPTER_FILE))  # the tower's adapter, gathered as well
    assert vision_adapter and all(t.numel() > 0 for t in vision_adapter.values())
    assert all(t.abs().sum() > 0 for k, t in vision_adapter.items() if k.endswith("lora_B"))
    for prefix, saved in (("llm.", adapter), ("projector.", projector), ("vision.visual.", vision_adapter)):
        for key, tensor in saved.items():
            assert torch.equal(consolidated[prefix + key], tensor), key
    for name in INFERENCE_FILES:  # the step folder holds the same inference files
        step_file = load_file(str(out / "checkpoints" / "step-2" / name))
        assert all(torch.equal(step_file[k], v) for k, v in load_file(str(out / name)).items())

    # Loads into one process and runs.
    model, tokenizer, config = load_checkpoint(out)
    assert (config.bits == 4) == (count_quantized(model.llm) == 28) == (not packing)  # the QLoRA base rebuilt
    loaded = dict(model.llm.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in adapter.items())
    record = image_records(small_demo_data, 1)[0]
    turns = [{"from": "human", "value": "<image>\n" + record["conversations"][0]["value"].replace("<image>\n", "")},
             {"from": "gpt", "value": record["conversations"][1]["value"]}]
    input_ids, _ = tokenize_conversation(turns, tokenizer, config.conv_mode, model.num_image_tokens, 512)
    pixels = ImageProcessor.for_tower(model.vision)(load_image(small_demo_data / "images" / record["image"]))
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids)[None], pixel_values=pixels[None]).logits
    assert logits.shape[:2] == (1, len(input_ids)) and torch.isfinite(logits).all()


# ---------------------------------------------------------------- 4. command line
def test_unknown_flag_exits_2_naming_it(capsys):
    for argv, named in ((["--lora_r", "8", "--no_such_flag", "3"], "--no_such_flag"),
                        (["--lora_dropou", "0.1"], "--lora_dropou")):  # no abbreviations either
        with pytest.raises(SystemExit) as exit_info:
            parse_args("finetune", argv)
        assert exit_info.value.code == 2
        assert named in capsys.readouterr().err


def test_bool_flags_take_llava_spelling_and_bare_form(capsys):
    assert parse_args("finetune", ["--bf16", "True"]).bf16 is True
    assert parse_args("finetune", ["--bf16"]).bf16 is True
    assert parse_args("finetune", ["--bf16", "false", "--lora_r", "8"]).bf16 is False
    assert parse_args("finetune", []).bf16 is False
    assert parse_args("pretrain", ["--tune_mm_mlp_adapter", "True", "--gradient_checkpointing"]).gradient_checkpointing
    for argv, message in ((["--bf16", "maybe"], "--bf16"), (["--bf16", "--fp16", "True"], "exclusive")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args("finetune", argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def fill(path: Path, micro_batch: int = 8, hidden_size: int | None = 128) -> dict:
    return load_deepspeed_config(path, micro_batch=micro_batch, grad_accum=1, world_size=2, bf16=False, fp16=False,
                                 max_grad_norm=1.0, hidden_size=hidden_size)


def test_deepspeed_config_errors_name_the_file_and_the_place(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')  # trailing comma on line 3
    with pytest.raises(ConfigError, match=rf"{re.escape(str(broken))}: invalid JSON at line 4"):
        fill(broken)
    conflicting = tmp_path / "conflict.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"conflict\.json: key 'train_micro_batch_size_per_gpu' is 4 but "
                                          r"--per_device_train_batch_size gives 8"):
        fill(conflicting, micro_batch=8)
    assert fill(conflicting, micro_batch=4)["train_batch_size"] == 8  # 4 per rank x 2 ranks
    (tmp_path / "opt.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="key 'optimizer' is not supported"):
        fill(tmp_path / "opt.json")
    # The shipped configs fill completely; without a hidden size only the ZeRO bucket sizes stay "auto".
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        cfg = fill(CONFIGS / name)
        assert "auto" not in json.dumps(cfg) and cfg["train_micro_batch_size_per_gpu"] == 8
    early = fill(CONFIGS / "zero3.json", hidden_size=None)["zero_optimization"]
    assert early["reduce_bucket_size"] == "auto" and early["stage"] == 3


def test_help_and_a_config_conflict_answer_before_any_model_loads(tmp_path):
    conflicting = tmp_path / "my_zero2.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    # The data file does not exist either: the config is checked first, so that error is the one reported.
    conflict = start(finetune_cmd("--deepspeed", conflicting, "--data_path", tmp_path / "missing.json",
                                  "--per_device_train_batch_size", "8", "--lora_r", "8", "--report_to", "none",
                                  "--output_dir", tmp_path / "out"), tmp_path, "conflict")
    help_run = run([sys.executable, SCRIPTS / "pretrain.py", "--help"], tmp_path, name="help")
    assert help_run.stdout.startswith("usage: pretrain.py")
    for flag in ("--data_path", "--deepspeed", "--mm_projector_lr", "--bf16"):
        assert flag in help_run.stdout
    conflict_run = finish(conflict, expect_ok=False)
    assert conflict_run.returncode != 0
    assert "my_zero2.json: key 'train_micro_batch_size_per_gpu' is 4" in conflict_run.stderr
    assert "missing.json" not in conflict_run.stderr and not (tmp_path / "out").exists()


BAD_RECORDS = {  # index in the data file -> (id, what is wrong)
    2: ("bad-no-conversations", lambda r: {"id": r["id"], "image": r["image"]}),
    5: ("bad-missing-image", lambda r: {**r, "image": "train/not_there.png"}),
    9: ("bad-two-placeholders", lambda r: {**r, "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat is it?"}, {"from": "gpt", "value": "a square"}]}),
    14: ("bad-roles", lambda r: {**r, "conversations": [{"from": "gpt", "value": "hi"}]}),
}


def write_data_with_bad_records(data: Path, path: Path, corrupt_image: Path | None = None) -> Path:
    """16 good image records (with `corrupt_image`, the last one points at it) and the BAD_RECORDS among them."""
    good = image_records(data, 16)
    if corrupt_image is not None:
        good[-1] = {**good[-1], "id": "corrupt-image", "image": str(corrupt_image)}  # absolute: needs the opt-out
    records, bad_source = [], iter(image_records(data, 40)[20:])
    for index in range(len(good) + len(BAD_RECORDS)):
        if index in BAD_RECORDS:
            record_id, make_bad = BAD_RECORDS[index]
            records.append({**make_bad(next(bad_source)), "id": record_id})
        else:
            records.append(good.pop(0))
    path.write_text(json.dumps(records, indent=1))
    return path


def test_bad_records_stop_the_run_with_a_full_report_or_are_skipped(small_demo_data, tmp_path, recipe_in_process):
    data_file = write_data_with_bad_records(small_demo_data, tmp_path / "data.json")
    corrupt = tmp_path / "corrupt.png"  # a PNG cut short: it exists, validation passes, decoding fails
    corrupt.write_bytes((small_demo_data / "images" / image_records(small_demo_data, 1)[0]["image"]).read_bytes()[:60])
    skip_file = write_data_with_bad_records(small_demo_data, tmp_path / "skip.json", corrupt_image=corrupt)
    # The refused run is the real command (its exit status); the skipping one runs in this process meanwhile.
    strict = start(finetune_cmd(*data_flags(small_demo_data, data_file), *FAST, "--output_dir", tmp_path / "strict"),
                   tmp_path, "strict")
    # One epoch (16 usable records / 4 per step) draws every record, the corrupt image included.
    skipping = recipe_in_process("finetune", [*data_flags(small_demo_data, skip_file), *FAST, "--skip_bad_samples",
                                              "--allow_images_outside_folder", "--group_by_modality_length",
                                              "False", "--output_dir", tmp_path / "skip"])
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    strict = finish(strict, expect_ok=False)

    assert strict.returncode != 0 and not (tmp_path / "strict" / "train_summary.json").exists()
    lines = strict.stderr.splitlines()
    for index, (record_id, _) in BAD_RECORDS.items():
        assert any(re.search(rf"\b{index}\b", line) and record_id in line for line in lines), \
            f"record {index} ({record_id}) not reported:\n{strict.stderr[-3000:]}"
    assert "--skip_bad_samples" in strict.stderr

    summary_line = next(line for line in skipping.stdout.splitlines() if line.startswith(SUMMARY))
    assert "4 steps" in summary_line
    assert "1 images skipped" in summary_line and f"{len(BAD_RECORDS)} records dropped" in summary_line
    summary = json.loads((tmp_path / "skip" / "train_summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["dropped_records"] == len(BAD_RECORDS)
    assert summary["samples"] == 15  # 16 drawn, 1 skipped


# ---------------------------------------------------------------- 5. outputs, default data
def test_default_demo_data_run_writes_summary_tensorboard_and_learns(tmp_path, recipe_in_process, monkeypatch):
    """No --data_path: the demo data is generated under ./outputs/demo_data of the working directory."""
    import functools

    from mm_moslora import demo_data

    monkeypatch.chdir(tmp_path)
    # The generator's default size (4000 + 4000 records, 7 s) is not what is tested here: where and that it is made.
    monkeypatch.setattr(demo_data, "generate", functools.partial(demo_data.generate, n_train=200, n_pretrain=8,
                                                                 n_eval=8))
    proc = recipe_in_process("finetune", ["--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size",
                                          "4", "--max_steps", "20", "--learning_rate", "1e-3", "--mm_projector_lr",
                                          "1e-4", "--save_steps", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = tmp_path / "outputs" / "demo_data"
    assert (demo / "manifest.json").is_file() and (demo / "finetune.json").is_file()
    out = tmp_path / "outputs" / "finetune-tiny"
    summary_lines = [line for line in proc.stdout.splitlines() if line.startswith(SUMMARY)]
    assert len(summary_lines) == 1 and "20 steps" in summary_lines[0]
    assert summary_lines[0].endswith(str(Path("outputs/finetune-tiny")))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 20 and summary["samples"] == 80 and math.isfinite(summary["final_loss"])
    assert summary["liger_kernel"].startswith(("on (auto:", "off (auto:")) and "Liger Kernel " in summary_lines[0]
    assert list((out / "runs").glob("**/events.out.tfevents.*"))

    logged = scalars(out / "runs")
    losses = [value for _, value in logged["train/loss"]]
    assert [step for step, _ in logged["train/loss"]] == list(range(1, 21))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert losses[-1] == pytest.approx(summary["final_loss"], abs=1e-5)
    # --mm_projector_lr reaches the optimizer: the projector's group runs at a tenth of the adapters' rate.
    for (_, adapter_lr), (_, projector_lr) in zip(logged["train/lr"], logged["train/lr_projector"]):
        assert projector_lr == pytest.approx(adapter_lr / 10, rel=1e-5)
    for name in ("mm_config.json", "moslora_config.json", *INFERENCE_FILES):
        assert (out / name).is_file()


# ---------------------------------------------------------------- 6. learning rates
def test_mm_projector_lr_gets_its_own_optimizer_group():
    from mm_moslora.adapters import AdapterConfig, inject_adapters
    from mm_moslora.model.build import build_model
    from mm_moslora.train.engine import param_groups

    model, _ = build_model("tiny")
    model.requires_grad_(False)
    inject_adapters(model.llm, AdapterConfig(r=8, alpha=16, base_model="tiny"))
    model.projector.requires_grad_(True)
    projector_ids = {id(p) for p in model.projector.parameters()}
    groups = param_groups(model, learning_rate=2e-4, mm_projector_lr=2e-5, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["projector"]["params"]} == projector_ids
    assert by_name["projector"]["lr"] == 2e-5 and by_name["projector"]["weight_decay"] == 0.0
    assert by_name["adapter"]["lr"] == 2e-4 and by_name["adapter"]["weight_decay"] == 0.1
    assert all(id(p) not in projector_ids for p in by_name["adapter"]["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    # Without --mm_projector_lr the projector follows --learning_rate; stage 1 has only the projector group.
    assert {g["lr"] for g in param_groups(model, 2e-4, None, 0.0)} == {2e-4}
    for module in model.llm.modules():
        module.requires_grad_(False)
    assert [g["name"] for g in param_groups(model, 1e-3, None, 0.0)] == ["projector"]


def test_a_diverging_run_stops_with_a_clear_error(small_demo_data, tmp_path, recipe_in_process):
    """No per-gradient overflow scan in bf16 (see deepspeed_configs): a NaN loss must stop the run instead."""
    proc = recipe_in_process("finetune", [*data_flags(small_demo_data), *FAST, "--learning_rate", "1e30",
                                          "--mm_projector_lr", "1e30", "--max_steps", "8", "--output_dir",
                                          tmp_path / "out"])
    assert proc.returncode == 1, proc.stderr[-2000:]  # the status scripts/finetune.py exits with
    assert "training diverged" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "train_summary.json").exists()
