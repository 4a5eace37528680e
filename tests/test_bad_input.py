"""The bad-input contract (docs/bad_input.md): hostile or broken files, flags, images and requests end in one
`error:` line naming the thing and the reason, a non-zero exit, nothing lost or half-written, and no code run.

Training runs in this process (the tiny model trains a step in well under a second); subprocesses only where
the command line's one-line error and exit status are what is tested.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_moslora.train.args import parse_args
from mm_moslora.train.recipe import run as run_training
from tests.helpers import REPO_ROOT, subprocess_env

FAST = ["--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4", "--report_to", "none"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def train(small_demo_data, tmp_path, capsys):
    """train(*flags) -> (exit status, stderr) of scripts/finetune.py's entry point, run in this process on the
    small demo data into tmp_path/out (unless --output_dir is given)."""
    saved_env = dict(os.environ)  # init_distributed sets RANK, MASTER_PORT, ...: not for later subprocesses

    def go(*flags, data: Path | None = None, image_folder: Path | None = None) -> tuple[int, str]:
        flags = [str(f) for f in flags]
        argv = ["--data_path", str(data or small_demo_data / "finetune.json"),
                "--image_folder", str(image_folder or small_demo_data / "images"), *FAST, *flags]
        if "--output_dir" not in flags:
            argv += ["--output_dir", str(tmp_path / "out")]
        capsys.readouterr()
        code = run_training(parse_args("finetune", argv))
        return code, capsys.readouterr().err

    yield go
    os.environ.clear()
    os.environ.update(saved_env)
    from mm_moslora.data.images import allow_images_outside_folder

    allow_images_outside_folder(False)  # a run sets this process-wide rule from its flag: back to the default


def one_error_line(err: str) -> str:
    """The single `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


class RunsCode:
    """Pickles to a call of os.mkdir(path): loading it with full unpickling creates `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def rewrite_manifest(step: Path) -> None:
    """What an attacker who can write the folder does after swapping a file: a matching manifest."""
    if (step / "manifest.json").exists():
        from mm_moslora.train.checkpoint import write_manifest

        write_manifest(step)


def data_with_images(small_demo_data: Path, folder: Path, n: int, corrupt: set[int] = frozenset()) -> Path:
    """`n` image records of the demo set with their images copied into folder/images; records in `corrupt`
    point at an image cut short (it exists, so validation passes; decoding fails). Returns the data file."""
    records = [r for r in json.loads((small_demo_data / "finetune.json").read_text()) if r.get("image")][:n]
    images = folder / "images"
    images.mkdir(parents=True)
    for index, record in enumerate(records):
        data = (small_demo_data / "images" / record["image"]).read_bytes()
        record["image"] = f"img{index}.png"
        (images / record["image"]).write_bytes(data[:60] if index in corrupt else data)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------- code execution from a checkpoint
def test_rng_state_is_stored_weights_only_loadable(train, tmp_path):
    code, err = train("--max_steps", "1")
    assert code == 0, err
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-1" / "rng_state_0.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= state.keys()


@pytest.mark.parametrize("victim", ["rng_state_0.pt", "mp_rank_00_model_states.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(train, tmp_path, victim):
    code, err = train("--max_steps", "2", "--save_steps", "1")
    assert code == 0, err
    step = tmp_path / "out" / "checkpoints" / "step-2"
    marker = tmp_path / "code-ran"
    torch.save({"python": RunsCode(marker), "module": RunsCode(marker)}, step / victim)

    # Swapped alone: the manifest does not match it any more.
    code, err = train("--max_steps", "3")
    assert code == 2 and not marker.exists()
    assert f"{victim} differs from the file written with this checkpoint" in one_error_line(err)
    # Swapped with a rewritten manifest: loaded weights-only, so it is refused instead of run.
    rewrite_manifest(step)
    code, err = train("--max_steps", "3")
    assert not marker.exists(), "the checkpoint ran code"
    assert code == 2 and "weights_only" in one_error_line(err) and str(step) in err


def test_latest_naming_a_folder_outside_is_refused(train, tmp_path):
    code, err = train("--max_steps", "1", "--output_dir", tmp_path / "elsewhere")
    assert code == 0, err
    code, err = train("--max_steps", "1")
    assert code == 0, err
    (tmp_path / "out" / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step-1")
    code, err = train("--max_steps", "2")
    assert code == 2 and "not a step-K folder" in one_error_line(err)
    assert not (tmp_path / "out" / "checkpoints" / "step-2").exists()


@pytest.mark.parametrize("lost, named_without_manifest", [("mp_rank_00_model_states.pt", "model-state file"),
                                                          ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                           "optimizer-state file"),
                                                          ("rng_state_0.pt", "rng_state_0.pt is missing")])
def test_a_step_folder_missing_a_state_file_is_refused(train, tmp_path, lost, named_without_manifest):
    code, err = train("--max_steps", "1")
    assert code == 0, err
    step = tmp_path / "out" / "checkpoints" / "step-1"
    (step / lost).unlink()
    code, err = train("--max_steps", "2")
    assert code == 2 and lost in one_error_line(err)
    # The same without a manifest (an older checkpoint): the files a resume needs are still checked.
    (step / "manifest.json").unlink()
    code, err = train("--max_steps", "2")
    assert code == 2 and named_without_manifest in one_error_line(err)


def test_a_truncated_state_file_is_refused_with_its_name(train, tmp_path):
    code, err = train("--max_steps", "1")
    assert code == 0, err
    optim = tmp_path / "out" / "checkpoints" / "step-1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:100])
    code, err = train("--max_steps", "2")
    assert code == 2 and "zero_pp_rank_0_mp_rank_00_optim_states.pt differs from the file written with this checkpoint: 100 bytes" in one_error_line(err)


def test_older_rng_state_files_still_resume(train, tmp_path):
    """Written before the weights-only format: numpy's tuple inside. Loaded weights-only (numpy arrays allowed)."""
    import random

    import numpy as np

    code, err = train("--max_steps", "1")
    assert code == 0, err
    step = tmp_path / "out" / "checkpoints" / "step-1"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               step / "rng_state_0.pt")
    (step / "manifest.json").unlink()
    code, err = train("--max_steps", "2")
    assert code == 0, err


# ---------------------------------------------------------------- resume with other flags
def test_resume_with_other_model_or_optimisation_flags_is_refused_with_the_list(train, tmp_path):
    code, err = train("--max_steps", "2", "--save_steps", "1")
    assert code == 0, err
    adapter_before = (tmp_path / "out" / "moslora_adapter.safetensors").read_bytes()
    for flags, named in ((["--lora_alpha", "32"], ["--lora_alpha 16.0 -> 32.0"]),
                         (["--learning_rate", "1e-3", "--lora_r", "4"],
                          ["--learning_rate 0.0002 -> 0.001", "--lora_r 8 -> 4"]),
                         (["--adapter", "lora"], ["--adapter moslora -> lora"])):
        code, err = train("--max_steps", "3", *flags)
        line = one_error_line(err)
        assert code == 2 and all(n in line for n in named), line
    assert not (tmp_path / "out" / "checkpoints" / "step-3").exists()
    assert (tmp_path / "out" / "moslora_adapter.safetensors").read_bytes() == adapter_before
    # Longer runs, other save and logging settings: resumed.
    code, err = train("--max_steps", "3", "--save_steps", "5", "--logging_steps", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["steps"] == 3


# ---------------------------------------------------------------- silently wrong training
def test_a_run_whose_every_image_fails_to_decode_fails_and_writes_nothing(train, small_demo_data, tmp_path):
    data = data_with_images(small_demo_data, tmp_path / "bad", 12, corrupt=set(range(12)))
    code, err = train("--max_steps", "3", "--group_by_modality_length", "False", data=data,
                      image_folder=tmp_path / "bad" / "images")
    assert code == 2 and "could be decoded" in one_error_line(err)
    out = tmp_path / "out"
    assert not (out / "train_summary.json").exists() and not (out / "moslora_adapter.safetensors").exists()
    assert not list((out / "checkpoints").glob("step-*"))


def test_steps_whose_every_sample_was_skipped_are_counted_not_logged_as_loss_zero(train, small_demo_data, tmp_path):
    from tests.test_train import scalars

    data = data_with_images(small_demo_data, tmp_path / "some", 8, corrupt={1, 5})
    code, err = train("--max_steps", "8", "--per_device_train_batch_size", "1", "--group_by_modality_length",
                      "False", "--report_to", "tensorboard", "--save_steps", "0", data=data,
                      image_folder=tmp_path / "some" / "images")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["skipped_images"] == 2 and summary["skipped_steps"] == 2 and summary["samples"] == 6
    logged = scalars(tmp_path / "out" / "runs")
    losses = dict(logged["train/loss"])
    assert len(losses) == 6 and all(value > 0.1 for value in losses.values()), losses
    assert [value for _, value in logged["train/skipped_steps"]] == [1, 2]
    assert not set(losses) & {step for step, _ in logged["train/skipped_steps"]}


# ---------------------------------------------------------------- images stay in their folder
def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height pixels (a decompression bomb's first bytes: a few dozen)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def image_folders(tmp_path):
    """tmp/images/ (the folder: a.png, link_out.png -> ../secret.png, sub/b.png) and tmp/secret.png outside."""
    from tests.helpers import make_images

    folder = tmp_path / "images"
    make_images(folder, 1)[0].rename(folder / "a.png")
    make_images(folder / "sub", 1)[0].rename(folder / "sub" / "b.png")
    make_images(tmp_path, 1)[0].rename(tmp_path / "secret.png")
    (folder / "link_out.png").symlink_to(tmp_path / "secret.png")
    (folder / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    return folder


def test_image_paths_cannot_leave_the_folder_unless_allowed(image_folders, tmp_path):
    from mm_moslora.data.images import resolve_image_path

    inside = {"a.png": image_folders / "a.png", "sub/b.png": image_folders / "sub" / "b.png",
              "sub/../a.png": image_folders / "a.png"}
    for image, expected in inside.items():
        assert resolve_image_path(image, image_folders) == expected.resolve()
    outside = {str(tmp_path / "secret.png"): "is absolute", "link_out.png": "is a symlink out of",
               "linked_dir/secret.png": "is a symlink out of", "../secret.png": "leaves"}
    for image, reason in outside.items():
        with pytest.raises(ValueError, match=reason) as info:
            resolve_image_path(image, image_folders)
        assert "--allow_images_outside_folder" in str(info.value)
        assert resolve_image_path(image, image_folders, allow_outside=True).resolve() == (tmp_path / "secret.png")
    # The folder itself may be a link (a dataset kept elsewhere).
    (tmp_path / "folder_link").symlink_to(image_folders, target_is_directory=True)
    assert resolve_image_path("a.png", tmp_path / "folder_link") == (image_folders / "a.png").resolve()


def test_training_data_with_images_outside_the_folder_is_refused(train, small_demo_data, tmp_path):
    records = [r for r in json.loads((small_demo_data / "finetune.json").read_text()) if r.get("image")][:8]
    folder = tmp_path / "images"
    folder.mkdir()
    for index, record in enumerate(records):
        target = small_demo_data / "images" / record["image"]
        if index == 3:  # an absolute path
            record["image"] = str(target)
        else:
            link = folder / f"img{index}.png"
            if index == 5:  # a symlink to a file outside the folder
                link.symlink_to(target)
            else:
                link.write_bytes(target.read_bytes())
            record["image"] = link.name
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    code, err = train("--max_steps", "1", data=data, image_folder=folder)
    assert code == 2 and "Traceback" not in err
    assert "record 3" in err and "is absolute" in err and "record 5" in err and "symlink out of" in err
    assert not (tmp_path / "out" / "checkpoints").exists() or not list((tmp_path / "out" / "checkpoints").iterdir())
    code, err = train("--max_steps", "1", "--allow_images_outside_folder", data=data, image_folder=folder)
    assert code == 0, err


# ---------------------------------------------------------------- eval/run_vqa.py question files
@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
    from tests.helpers import make_eval_set

    return make_eval_set(tmp_path_factory.mktemp("vqa_bad"), n_questions=4)


def run_vqa_main(vqa_set, questions: list | str, tmp_path: Path, *extra, image_folder: Path | None = None):
    """(exit status, stderr, answers written) of eval/run_vqa.py on `questions` (records, or raw file text)."""
    from eval import run_vqa
    from tests.helpers import single_thread

    question_file = tmp_path / "questions.jsonl"
    question_file.write_text(questions if isinstance(questions, str)
                             else "".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "answers.jsonl"
    with single_thread():
        code = run_vqa.main(["--model", str(vqa_set["checkpoint"]), "--question-file", str(question_file),
                             "--image-folder", str(image_folder or vqa_set["images"]), "--answers-file",
                             str(answers), "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", *extra])
    return code, answers.read_text().splitlines() if answers.exists() else []


def vqa_questions(vqa_set) -> list[dict]:
    return [json.loads(line) for line in vqa_set["questions"].read_text().splitlines()]


@pytest.mark.parametrize("corrupt, named", [
    (lambda text: text.replace("\n", "\nnull\n", 1), "questions.jsonl:2: a question must be a JSON object"),
    (lambda text: text.replace('"question_id": "q1"', '"question_id": ["q", 1]'),
     "'question_id' must be a string or an integer"),
    (lambda text: json.dumps({"questions": [json.loads(line) for line in text.splitlines()]}, indent=2),
     "one JSON object (1 keys: questions); expected one object per line"),
    (lambda text: text + text.splitlines()[0] + "\n", "question q0 appears twice with the same text"),
])
def test_bad_question_files_are_one_line_errors_before_the_model_loads(vqa_set, tmp_path, capsys, monkeypatch,
                                                                       corrupt, named):
    from mm_moslora.infer import InferenceEngine

    monkeypatch.setattr(InferenceEngine, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    code, answers = run_vqa_main(vqa_set, corrupt(vqa_set["questions"].read_text()), tmp_path)
    assert code == 2 and named in one_error_line(capsys.readouterr().err) and not answers


def test_shared_ids_and_questions_without_an_image_are_answered_with_a_warning(vqa_set, tmp_path, capsys):
    questions = vqa_questions(vqa_set)
    questions[1]["question_id"] = questions[0]["question_id"]  # as in LLaVA's MME file: the image path as id
    questions[1]["text"] += " Please answer yes or no."
    del questions[2]["image"]
    questions[2]["text"] = questions[2]["text"].replace("<image>\n", "")
    code, answers = run_vqa_main(vqa_set, questions, tmp_path)
    err = capsys.readouterr().err
    assert code == 0 and len(answers) == 4, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "1 question ids are shared" in warnings[0] and "1 of 4 questions have no image" in warnings[1]
    # Resuming tells the two questions of id q0 apart by their prompt: nothing is asked twice or skipped.
    code, again = run_vqa_main(vqa_set, questions, tmp_path)
    assert code == 0 and again == answers


def test_images_outside_the_folder_and_bombs_are_refused_in_run_vqa(vqa_set, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(vqa_set["images"], folder)
    (folder / "link.png").symlink_to(vqa_set["images"] / "img0.png")
    questions = vqa_questions(vqa_set)
    questions[1]["image"] = "link.png"
    code, answers = run_vqa_main(vqa_set, questions, tmp_path, image_folder=folder)
    assert code == 2 and "question q1: image path 'link.png' is a symlink out of" in one_error_line(
        capsys.readouterr().err) and not answers
    code, answers = run_vqa_main(vqa_set, questions, tmp_path, "--allow-images-outside-folder", image_folder=folder)
    assert code == 0 and len(answers) == 4
    (tmp_path / "answers.jsonl").unlink()
    bomb_png(folder / "bomb.png", 12_000, 12_000)
    questions[3]["image"] = "bomb.png"
    code, answers = run_vqa_main(vqa_set, questions, tmp_path, "--allow-images-outside-folder", image_folder=folder)
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "question q3" in line and "12000x12000 pixels" in line
    assert len(answers) == 2  # the batch before it is kept


# ---------------------------------------------------------------- chat
def test_a_decompression_bomb_in_chat_is_one_error_and_the_session_goes_on(tmp_path, monkeypatch, capsys):
    from mm_moslora import chat
    from tests.helpers import make_images

    good = make_images(tmp_path, 1)[0]
    for size in ((12_000, 12_000), (30_000, 30_000)):  # over Pillow's warning limit; over its error limit
        bomb = bomb_png(tmp_path / f"bomb{size[0]}.png", *size)
        with pytest.raises(chat.ChatError, match=rf"{size[0]}x{size[1]} pixels|exceeds limit"):
            chat.open_image(str(bomb), allow_url=False)
    session = chat.Chat(engine=None, args=chat.parse_args(["--model", "unused"]))
    lines = iter([f"/image {tmp_path / 'bomb30000.png'}", f"/image {good}", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session.loop()
    out, err = capsys.readouterr()
    assert session.image_spec == str(good) and f"image: {good}" in out
    assert "bomb30000.png" in one_error_line(err)


# ---------------------------------------------------------------- broken checkpoints: one line from every command
def break_checkpoint(checkpoint: Path, how: str) -> str:
    """Damage `checkpoint` as `how` says; returns what the error must say."""
    from mm_moslora.checkpoint import MM_CONFIG, PROJECTOR_FILE

    adapter = checkpoint / "moslora_adapter.safetensors"
    if how == "zero-byte adapter":
        adapter.write_bytes(b"")
        return f"{adapter}: adapter weights: empty file"
    if how == "truncated adapter":
        adapter.write_bytes(adapter.read_bytes()[:200])
        return f"{adapter}: adapter weights: not a readable safetensors file"
    if how == "adapter config not an object":
        (checkpoint / "moslora_config.json").write_text("[1, 2]")
        return "moslora_config.json: must hold a JSON object, found list"
    if how == "truncated projector":
        (checkpoint / PROJECTOR_FILE).write_bytes((checkpoint / PROJECTOR_FILE).read_bytes()[:100])
        return "projector: not a readable safetensors file"
    if how == "mm_config not an object":
        (checkpoint / MM_CONFIG).write_text('"tiny"')
        return "must hold a JSON object, found str"
    if how == "mm_config without conv_mode":
        values = json.loads((checkpoint / MM_CONFIG).read_text())
        del values["conv_mode"]
        (checkpoint / MM_CONFIG).write_text(json.dumps(values))
        return "missing key(s) conv_mode"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["zero-byte adapter", "truncated adapter", "adapter config not an object",
                                 "truncated projector", "mm_config not an object", "mm_config without conv_mode"])
def test_a_broken_checkpoint_is_one_line_in_chat_run_vqa_and_merge(how, tmp_path, capsys):
    from eval import run_vqa
    from mm_moslora import chat
    from scripts.merge import main as merge_main
    from tests.helpers import make_images, make_tiny_checkpoint, single_thread

    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt")
    named = break_checkpoint(checkpoint, how)
    image = make_images(tmp_path / "images", 1)[0]
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": image.name, "text": "What?"}) + "\n")
    commands = {
        "chat": lambda: chat.main(["--model", str(checkpoint), "--image", str(image), "--prompt", "hi",
                                   "--device", "cpu"]),
        "run_vqa": lambda: run_vqa.main(["--model", str(checkpoint), "--question-file", str(tmp_path / "q.jsonl"),
                                         "--image-folder", str(image.parent), "--answers-file",
                                         str(tmp_path / "a.jsonl"), "--device", "cpu"]),
        "merge": lambda: merge_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "merged")]),
    }
    for name, command in commands.items():
        capsys.readouterr()
        with single_thread():
            code = command()
        err = capsys.readouterr().err
        assert code == 2 and named in one_error_line(err), (name, err)
    assert not (tmp_path / "merged").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- exports: files lost or left
def test_merge_killed_midway_leaves_nothing_after_the_next_run(tmp_path):
    import signal
    import time

    from mm_moslora.export import export_checkpoint
    from mm_moslora.export_folder import EXPORT_MARKER
    from tests.helpers import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "exports" / "merged"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "merge.py"), "--checkpoint", str(checkpoint),
                             "--output", str(out)], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.parent.glob(".merged.tmp-*")):  # killed while it writes its staging folder
        assert proc.poll() is None and time.time() < deadline, "merge ended before it was killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(out.parent.glob(".merged.tmp-*"))  # what a kill leaves: a hidden partial
    export_checkpoint(checkpoint, out, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"] and (out / EXPORT_MARKER).is_file()


def test_an_old_export_moved_aside_by_a_killed_overwrite_is_restored(tmp_path):
    from mm_moslora.export_folder import EXPORT_MARKER, recover_interrupted_export

    out = tmp_path / "merged"
    dead_pid = 2 ** 22 + 12345  # above Linux's pid_max default: no such process
    backup = tmp_path / f".merged.old-{dead_pid}-abcd1234"
    backup.mkdir()
    (backup / EXPORT_MARKER).write_text("{}")
    (backup / "weights").write_text("the previous export")
    staging = tmp_path / f".merged.tmp-{dead_pid}-abcd1234"
    staging.mkdir()
    (staging / "weights").write_text("half of the new one")
    running = tmp_path / f".merged.tmp-{os.getpid()}-0000aaaa"  # an export in progress (this process): kept
    running.mkdir()
    recover_interrupted_export(out)
    assert (out / "weights").read_text() == "the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", running.name])


def test_the_demo_reports_a_failed_step_in_one_line(vqa_set, tmp_path):
    """A decompression bomb among the images: run_vqa's one-line error is what the demo (pipeline) reports."""
    from mm_moslora.pipeline import PipelineError, answer_benchmarks

    folder = tmp_path / "images"
    shutil.copytree(vqa_set["images"], folder)
    bomb_png(folder / "img1.png", 12_000, 12_000)
    cmd = [sys.executable, "eval/run_vqa.py", "--model", str(vqa_set["checkpoint"]), "--question-file",
           str(vqa_set["questions"]), "--image-folder", str(folder), "--answers-file", str(tmp_path / "a.jsonl"),
           "--device", "cpu", "--max-new-tokens", "2"]
    with pytest.raises(PipelineError) as info:
        answer_benchmarks([("vqav2", cmd, tmp_path / "vqav2.log")], subprocess_env(), workers=1, echo=lambda _: None)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert "question q1: cannot decode image" in message and "12000x12000 pixels" in message


@pytest.mark.parametrize("content, reason", [(b"", "cannot read it"), (b"\x20\x00\x00\x00\x00\x00\x00\x00{",
                                                                      "cannot read it")])
def test_a_zero_byte_or_truncated_stage1_projector_is_one_line(train, tmp_path, content, reason):
    projector = tmp_path / "mm_projector.safetensors"
    projector.write_bytes(content)
    code, err = train("--max_steps", "1", "--pretrain_mm_mlp_adapter", projector)
    assert code == 2 and str(projector) in one_error_line(err) and reason in err
    assert not (tmp_path / "out" / "train_summary.json").exists()
