"""Liger Kernel's Triton kernels on the CPU, in Triton's interpreter, against the plain path of the same model.

    TRITON_INTERPRET=1 python -m tests.liger_in_interpreter llama qwen2 gemma     # prints one JSON line per family

Run by tests/test_fused_kernels.py in a subprocess: Triton reads TRITON_INTERPRET when `triton.jit` decorates a
kernel, i.e. when liger_kernel is imported, so it cannot be switched on inside a test process that already
imported it. Two gaps of Triton 3.x's interpreter are bridged here, and nothing else is changed:
- float scalars passed to a kernel stay Python floats (ints and bools are wrapped), so Liger's `eps.to(tl.float32)`
  fails: they are wrapped as fp32 scalars, which is what the compiler does on a GPU;
- `libdevice` functions (`rsqrt`, `tanh`) are declarations that only the GPU compiler resolves: Liger's modules get
  the same functions written with `tl.math` / `tl.sigmoid`.
Each family: a 2-sample batch with an image, padding and masked prompts; MoSLoRA (dropout 0.1, non-zero B) on
every default target; the loss and the gradient of every trainable parameter (adapters and projector) with the
plain path, then with Liger applied to the same model, and the Liger autograd functions found in the graph.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def bridge_interpreter_gaps() -> None:
    """Call before liger_kernel is imported, with TRITON_INTERPRET=1 set."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    wrap = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return wrap(arg)

    interpreter._implicit_cvt = implicit_cvt

    import liger_kernel.transformers  # noqa: F401  (imports the ops modules whose globals are bridged below)

    replacements = {"rsqrt": lambda x: tl.math.rsqrt(x), "tanh": lambda x: 2 * tl.sigmoid(2 * x) - 1}
    for name, module in list(sys.modules.items()):
        if name.startswith("liger_kernel.ops"):
            for key, value in list(vars(module).items()):
                if key in replacements and "libdevice" in getattr(value, "__module__", ""):
                    setattr(module, key, replacements[key])


# Small random LMs in the Hugging Face config format: 2 layers, so that Triton's interpreter (one Python call per
# program: RoPE runs one per token and layer) keeps the test in seconds. LLaMA: the tiny model's family (RMSNorm,
# SwiGLU); Qwen2: q/k/v biases; Gemma: GeGLU, RMSNorm with an offset of 1, a tied head.
FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=768,
                  max_position_embeddings=512, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=768,
                  max_position_embeddings=512, tie_word_embeddings=False),
    "gemma": dict(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=768,
                  max_position_embeddings=512, hidden_activation="gelu_pytorch_tanh"),
}


# A random open_clip ViT with 16 patches (the tiny tower has 64): fewer tokens, fewer interpreted programs.
SMALL_TOWER = {"model_cfg": {"embed_dim": 32, "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32,
                                                           "heads": 2, "layers": 1},
                             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                            "head_width": 32}}}


def build(family: str):
    from mm_moslora.model.build import TINY_DIR, build_model

    folder = Path(tempfile.mkdtemp(prefix=f"liger-{family}-"))
    (folder / "lm").mkdir()
    (folder / "lm" / "config.json").write_text(json.dumps(FAMILY_CONFIGS[family]))
    for f in TINY_DIR.iterdir():
        if f.name.startswith("tokenizer"):
            (folder / "lm" / f.name).write_bytes(f.read_bytes())
    (folder / "tower").mkdir()
    (folder / "tower" / "open_clip_config.json").write_text(json.dumps(SMALL_TOWER))
    return build_model(str(folder / "lm"), str(folder / "tower"), mm_vision_select_layer=-1,
                       random_init_llm=True)[0]


def graph_functions(loss) -> set[str]:
    """Names of the autograd nodes behind `loss`."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def compare(family: str) -> dict:
    import torch

    from mm_moslora.adapters import AdapterConfig, inject_adapters
    from mm_moslora.model.fused_kernels import apply_liger_kernel
    from mm_moslora.model.mm_model import IMAGE_TOKEN_ID

    torch.manual_seed(0)
    model = build(family)
    model.llm.requires_grad_(False)
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=0.1))
    for name, param in model.llm.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(param, std=0.05)  # B = 0 would give A and M zero gradients: nothing compared
    model.train()
    n_img = model.num_image_tokens
    ids = torch.randint(5, 700, (2, n_img + 16))
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :n_img + 6] = -100
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    labels[1, -5:] = -100
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        torch.manual_seed(1)  # the same dropout masks on both paths
        loss = model(ids, mask, pixels, labels).loss
        return loss, torch.autograd.grad(loss, params), graph_functions(loss)

    plain_loss, plain_grads, _ = loss_and_grads()
    apply_liger_kernel(model)
    liger_loss, liger_grads, functions = loss_and_grads()
    grads = {}
    for name, a, b in zip(names, plain_grads, liger_grads):
        grads[name] = {"max_abs": float((a - b).abs().max()), "scale": float(a.abs().max())}
    return {"family": family, "plain_loss": plain_loss.item(), "liger_loss": liger_loss.item(),
            "liger_functions": sorted(f for f in functions if f.startswith("Liger")), "grads": grads}


def main(families: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (Liger's kernels run on the CPU only in Triton's interpreter)")
    bridge_interpreter_gaps()
    for family in families:
        print(json.dumps(compare(family)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["llama"])
