"""Shared test fixtures on disk: a tiny trained-looking checkpoint, a few images, a LLaVA question file.

Everything is built from fixed seeds, so two calls with the same arguments write identical files.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from mm_moslora.infer import Request
from mm_moslora.checkpoint import config_for_model, save_inference_files
from mm_moslora.model.build import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]

TEST_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # tiny ops: threads only add sync overhead


@contextmanager
def single_thread():
    """Run torch on one thread (for in-process tests of the tiny model; restores the old setting)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def image_batch_loss(model) -> torch.Tensor:
    """Loss of a random 2-sample batch with one image each and the first tokens masked, as a training step sees it."""
    from mm_moslora.model.mm_model import IMAGE_TOKEN_ID

    n_img = model.num_image_tokens
    ids = torch.randint(5, 700, (2, n_img + 12))
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :n_img + 4] = -100
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    return model(ids, torch.ones_like(ids), pixels, labels).loss


def subprocess_env() -> dict[str, str]:
    """Environment for running the project's CLIs: the repo root importable, one thread."""
    env = {**os.environ, **TEST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


IMAGE_COLOURS = ((220, 40, 40), (30, 160, 60), (40, 70, 210), (230, 200, 30), (120, 40, 160), (20, 20, 20))


def make_tiny_checkpoint(directory: str | Path, adapter: bool = True, conv_mode: str = "vicuna_v1",
                         seed: int = 0, adapter_kind: str = "moslora", **adapter_options) -> Path:
    """Write a stage-2 style checkpoint of the tiny model into `directory` and return its path.

    The random tiny model answers every image almost alike, so the projector is re-drawn at a large
    scale (image features then steer the LM) and, with `adapter`, a MoSLoRA adapter (r=8) with non-zero
    B is saved, so loading, merging and generation all depend on the saved adapter weights.
    adapter_options: further AdapterConfig fields (e.g. mixer_init="normal", freeze_mixer=True).
    """
    with torch.random.fork_rng(devices=[]):  # adapter init draws from the global generator
        torch.manual_seed(seed)
        return _write_tiny_checkpoint(Path(directory), adapter, conv_mode, seed, adapter_kind, adapter_options)


def _write_tiny_checkpoint(directory: Path, adapter: bool, conv_mode: str, seed: int, adapter_kind: str,
                           adapter_options: dict) -> Path:
    model, tokenizer = build_model("tiny", mm_projector_type="mlp2x_gelu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.projector.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    adapter_state = None
    if adapter:
        from mm_moslora.adapters import AdapterConfig, adapter_state_dict, inject_adapters

        config = AdapterConfig(adapter=adapter_kind, r=8, alpha=16.0, dropout=0.0, base_model="tiny",
                               **adapter_options)
        inject_adapters(model.llm, config)
        with torch.no_grad():
            for name, param in model.llm.named_parameters():
                if name.endswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        adapter_state = (config, adapter_state_dict(model.llm))
    checkpoint_config = config_for_model(model, "tiny", "mlp2x_gelu", conv_mode=conv_mode, image_aspect_ratio="pad",
                                         stage="finetune" if adapter else "pretrain")
    save_inference_files(directory, checkpoint_config, tokenizer, model.projector.state_dict(), adapter=adapter_state)
    return directory


def make_images(directory: str | Path, n: int = 3, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Write `n` distinct PNG images (a coloured background with a square at a varying place)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", size, IMAGE_COLOURS[i % len(IMAGE_COLOURS)])
        corner = (5 * i) % (size[0] // 2)
        image.paste((255, 255, 255), (corner, corner, corner + size[0] // 3, corner + size[1] // 3))
        path = directory / f"img{i}.png"
        image.save(path)
        paths.append(path)
    return paths


QUESTIONS = ("What is in the image?", "Describe the colours.", "Is there a square?", "What shape do you see?",
             "Answer with one word: what colour is the background of this picture?", "Count the objects.")


def make_question_file(path: str | Path, image_names: list[str], n: int = 8) -> Path:
    """A LLaVA question file with `n` questions cycling over `image_names` and QUESTIONS. Both styles of
    LLaVA's files occur: texts of questions 0, 1, 4, 5, 8, ... start with "<image>\n", the others do not.
    Each has a category and a metadata object."""
    path = Path(path)
    with path.open("w") as f:
        for i in range(n):
            text = QUESTIONS[i % len(QUESTIONS)]
            if i % 4 < 2:
                text = "<image>\n" + text
            image = image_names[i % len(image_names)]
            record = {"question_id": f"q{i}", "image": image, "text": text, "category": f"cat{i % 2}",
                      "metadata": {"image": image, "question": QUESTIONS[i % len(QUESTIONS)]}}
            f.write(json.dumps(record) + "\n")
    return path


def make_eval_set(directory: str | Path, n_questions: int = 8, n_images: int = 3) -> dict[str, Path]:
    """Checkpoint + images + question file under `directory`: {"checkpoint", "images", "questions"}."""
    directory = Path(directory)
    checkpoint = make_tiny_checkpoint(directory / "ckpt")
    image_paths = make_images(directory / "images", n_images)
    questions = make_question_file(directory / "questions.jsonl", [p.name for p in image_paths], n_questions)
    return {"checkpoint": checkpoint, "images": directory / "images", "questions": questions}


def mixed_requests(images) -> list[Request]:
    """16 requests of different lengths: one image, two images, and text only."""
    requests = [Request([{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)] * (1 + i % 3)}],
                        [images[i % len(images)]]) for i in range(13)]
    requests.append(Request([{"role": "user", "content": "Compare <image> with <image>."}], images[:2]))
    requests.append(Request([{"role": "user", "content": "Just text, no image."}], []))
    requests.append(Request([{"role": "user", "content": "<image>\nWhat is it?"},
                             {"role": "assistant", "content": "A picture."},
                             {"role": "user", "content": "Tell me more."}], [images[3]]))
    return requests


def adapter_reference(layer, x, h):
    """The MoSLoRA formula written out: W·x + b + s·B(M(A·h)), h being x after the dropout mask (tests compare the
    layer's training path with it)."""
    down = h @ layer.lora_A.t()
    if layer.lora_M is not None:
        down = down @ layer.lora_M.t()
    return x @ layer.base.weight.t() + layer.base.bias + layer.scaling * (down @ layer.lora_B.t())
