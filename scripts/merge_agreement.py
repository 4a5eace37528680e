"""How often the merged model answers as the adapter model does (greedy), on a LLaVA question file.

    python scripts/merge_agreement.py --checkpoint CKPT --question-file Q.jsonl --image-folder DIR [--limit 500] \
        [--device cuda --dtype bf16] [--batch-size 32] [--max-new-tokens 32]

The adapter model is the checkpoint loaded as trained (adapters unmerged; a QLoRA checkpoint on its 4/8-bit base);
the merged model is what `scripts/merge.py` writes (a QLoRA base dequantized, the adapters added in fp32, then
cast to --dtype). Prints one JSON line: questions, identical answers, the rate, and the first differing answers.
Measurement, not a test: exact agreement depends on the dtype (fp32: rounding only).
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm_moslora.data.conversation import IMAGE_PLACEHOLDER  # noqa: E402
from mm_moslora.data.images import load_image, resolve_image_path  # noqa: E402
from mm_moslora.errors import report_input_errors  # noqa: E402
from mm_moslora.infer import InferenceEngine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--image-folder", required=True)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--also-unquantized-base", action="store_true",
                    help="QLoRA checkpoints: also merge into the original, unquantized base weights (what merging onto "
                         "the fp16 base LM does) and count its agreement too")
    args = ap.parse_args()

    lines = Path(args.question_file).read_text().splitlines()
    questions = [json.loads(line) for line in lines if line.strip()][:args.limit]
    requests = []
    for q in questions:  # as eval/run_vqa.py asks them: "<image>\n" in front unless the text places it
        if not q.get("image"):
            requests.append(([{"role": "user", "content": q["text"]}], []))
            continue
        text = q["text"] if IMAGE_PLACEHOLDER in q["text"] else f"{IMAGE_PLACEHOLDER}\n{q['text']}"
        requests.append(([{"role": "user", "content": text}], [load_image(resolve_image_path(q["image"],
                                                                                              args.image_folder))]))
    sources = {"adapter": (args.checkpoint, False), "merged": (args.checkpoint, True)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.also_unquantized_base:
            sources["merged_into_unquantized_base"] = (unquantized_copy(args.checkpoint, Path(tmp)), True)
        answers = {}
        for name, (path, merge) in sources.items():
            engine = InferenceEngine.from_checkpoint(path, device=args.device, dtype=args.dtype, merge=merge)
            answers[name] = engine.generate(requests, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            del engine
    result = {"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype, "questions": len(questions)}
    for name in list(sources)[1:]:
        same = sum(a == b for a, b in zip(answers["adapter"], answers[name]))
        result[name] = {"identical": same, "rate": round(same / max(1, len(questions)), 4),
                        "first_differences": [{"question_id": q["question_id"], "adapter": a, name: b} for q, a, b
                                              in zip(questions, answers["adapter"], answers[name]) if a != b][:3]}
    print(json.dumps(result))
    return 0


def unquantized_copy(checkpoint: str, tmp: Path) -> str:
    """The checkpoint with its base declared unquantized (files linked, config rewritten)."""
    from mm_moslora.checkpoint import CheckpointConfig

    config = CheckpointConfig.read(checkpoint)
    if config.bits == 16:
        raise SystemExit(f"error: {checkpoint} is not a QLoRA checkpoint (bits 16): --also-unquantized-base needs one")
    copy = tmp / "unquantized"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    config.replace(bits=16, quant_type=None, double_quant=None, quantized_from=None).write(copy)
    return str(copy)


if __name__ == "__main__":
    sys.exit(report_input_errors(main))
