"""Benchmark batched generation: the same questions at batch size 1 and at --batch-size.

Prints questions/s for both, the speed-up, whether the answers agree (they must be identical in
fp32; in bf16 batched kernels may round differently and flip a few greedy choices), and the time of
each phase (image preprocessing wait, embedding, prefill, decode step, CUDA graph capture). Both batch
sizes run through one engine with one `--decode` setting; `--compare-decode` runs the whole measurement
for Hugging Face generate and the static decoder and compares their answers too.

    python eval/bench_generate.py --model CKPT --device cuda --dtype bf16
    python eval/bench_generate.py --random-model --llm-config llama-7b --vision-tower ViT-L-14-336 --device cuda
    python eval/bench_generate.py --random-model --llm-config llama-7b --vision-tower ViT-L-14-336 --dtype bf16 \
        --compare-decode

--random-model builds an untrained model of the given shape (no weights are needed): `tiny`, `llama-7b`
(LLaMA-2-7B's shape with the tiny tokenizer's vocabulary) or a JSON file of LlamaConfig fields. The
questions are synthetic: seeded random images and questions of varying length.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from mm_moslora.infer import DECODE_MODES, InferenceEngine, Request, Timings
from mm_moslora.model.build import TINY, TINY_DIR, build_tokenizer, parse_dtype
from mm_moslora.model.mm_model import MultimodalLM
from mm_moslora.model.projector import build_projector
from mm_moslora.model.vision import VisionTower

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
QUESTIONS = ("What is shown in this image?", "Describe the image in detail, including the colours and the layout.",
             "Is there a person in the picture? Answer yes or no.", "How many objects can you count?",
             "What might have happened just before this photo was taken, and what will happen next?")


def random_engine(llm_config: str, vision_tower: str, device: str, dtype: torch.dtype, decode: str = "auto",
                  ) -> InferenceEngine:
    """An untrained MultimodalLM of the given shape, built directly on `device` in `dtype`."""
    tokenizer = build_tokenizer(TINY)
    if llm_config == "tiny":
        fields = json.loads((TINY_DIR / "llm_config.json").read_text())
    elif llm_config == "llama-7b":
        fields = dict(LLAMA_7B)
    else:
        fields = json.loads(Path(llm_config).read_text())
    fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(**fields)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    vision = VisionTower(vision_tower).to(device=device, dtype=dtype)
    projector = build_projector("mlp2x_gelu", vision.hidden_size, config.hidden_size).to(device=device, dtype=dtype)
    return InferenceEngine(MultimodalLM(vision, projector, llm), tokenizer, "vicuna_v1", decode=decode)


def synthetic_requests(n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        size = (int(rng.integers(200, 640)), int(rng.integers(200, 640)))
        image = Image.fromarray(rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size)
        requests.append(Request([{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]}], [image]))
    return requests


def timed(engine: InferenceEngine, requests: list[Request], batch_size: int, max_new_tokens: int,
          ) -> tuple[list[str], float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = engine.generate(requests, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return answers, time.perf_counter() - start


def measure(engine: InferenceEngine, requests: list[Request], batch_sizes: tuple[int, ...], max_new_tokens: int,
            ) -> dict[int, list[str]]:
    """Time `requests` at each batch size with the engine's current decode setting; returns the answers."""
    path = engine.decode_path()
    graphs = path == "static" and engine.static_decoder.use_cuda_graph
    print(f"decode path: {path}" + (" (CUDA graphs)" if graphs else ""), flush=True)
    answers, seconds = {}, {}
    for batch_size in batch_sizes:
        # Warm-up right before timing: kernel selection, allocator and GPU clocks otherwise slow whichever size
        # runs first (seen on an H200: 63 ms vs 24 ms per decode step). The static decoder also captures a
        # graph per (batch size, cache length), so it warms up on every batch that the timed run will see.
        timed(engine, requests if path == "static" else requests[:batch_size], batch_size, max_new_tokens)
        engine.timings = Timings()
        answers[batch_size], seconds[batch_size] = timed(engine, requests, batch_size, max_new_tokens)
        print(f"batch size {batch_size:3d}: {len(requests)} questions in {seconds[batch_size]:7.2f} s = "
              f"{len(requests) / seconds[batch_size]:8.2f} questions/s", flush=True)
        print(engine.timings.summary(), flush=True)
        engine.timings = None
    if path == "static":
        print(f"static caches kept (batch size, cache length): {list(engine.static_decoder.slots)}")
    first, last = batch_sizes[0], batch_sizes[-1]
    print(f"speed-up: {seconds[first] / seconds[last]:.2f}x")
    report_agreement(f"answers at batch sizes {first} and {last}", answers[first], answers[last])
    return answers


def report_agreement(what: str, a: list[str], b: list[str]) -> None:
    agree = sum(x == y for x, y in zip(a, b))
    print(f"{what} agree: {agree}/{len(a)}" + (" (identical)" if agree == len(a) else ""), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder")
    source.add_argument("--random-model", action="store_true", help="an untrained model of --llm-config's shape")
    parser.add_argument("--llm-config", default="tiny", help="tiny, llama-7b, or a JSON file of LlamaConfig fields")
    parser.add_argument("--vision-tower", default="mm-tiny-vit", help="open_clip architecture, e.g. ViT-L-14-336")
    parser.add_argument("--n-questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--decode", choices=DECODE_MODES, default="auto",
                        help="auto: static cache + CUDA graphs on CUDA, Hugging Face generate on CPU")
    parser.add_argument("--compare-decode", action="store_true",
                        help="measure both Hugging Face generate and the static decoder, and compare their answers")
    args = parser.parse_args(argv)

    dtype = parse_dtype(args.dtype)
    engine = (random_engine(args.llm_config, args.vision_tower, args.device, dtype, args.decode) if args.random_model
              else InferenceEngine.from_checkpoint(args.model, device=args.device, dtype=dtype, decode=args.decode))
    requests = synthetic_requests(args.n_questions)
    batch_sizes = (1, args.batch_size)
    if not args.compare_decode:
        measure(engine, requests, batch_sizes, args.max_new_tokens)
        return
    answers = {}
    for decode in ("hf", "static"):
        engine.decode = decode
        answers[decode] = measure(engine, requests, batch_sizes, args.max_new_tokens)
    for batch_size in batch_sizes:
        report_agreement(f"hf and static answers at batch size {batch_size}", answers["hf"][batch_size],
                         answers["static"][batch_size])


if __name__ == "__main__":
    main()
