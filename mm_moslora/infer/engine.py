"""One generation engine for chat and evaluation: batched, left-padded, KV-cached `generate`.

A request is `(messages, images)`: chat messages [{"role", "content"}] whose `<image>` placeholders
match the PIL images in order. Prompts are built by `data.conversation.build_generation_prompt`, image
features are written into the embeddings by `MultimodalLM.embed`, and decoding is
either `static_decode.StaticDecoder` (static KV cache, CUDA-graph steps: the default on CUDA) or Hugging
Face's `generate(inputs_embeds=..., attention_mask=...)` (CPU, and the `decode="hf"` escape hatch). Both take position ids from the attention mask, so left padding does not shift positions and a
batch answers exactly as its requests would one by one (greedy, fp32), and both answer alike. Every row
also stops on its own: at eos, at the template's end-of-turn text, or when it reaches `max_new_tokens`
or the model's context, whatever the other rows of its batch do. Images are preprocessed in a thread
pool, the next batch's while the current one generates.

Per-request controls (`ReplyOptions`: own reply budget, own stop strings, a text callback, a cancel check)
let one batch carry requests of different clients (the server batches them so); both decoders check them
per row, Hugging Face generate after every token, the static decoder at its sync points.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from ..adapters import unload_adapters
from ..checkpoint import CheckpointConfig, load_checkpoint
from ..data.conversation import IMAGE_PLACEHOLDER, TEMPLATES, build_generation_prompt, stop_markers
from ..data.images import ImageProcessor
from ..model.build import parse_dtype
from ..model.mm_model import IMAGE_TOKEN_ID, MultimodalLM
from .static_decode import MASK_KINDS, StaticDecoder, Timings, phase

QUANTIZE_MODES = ("4bit", "8bit")
DECODE_MODES = ("auto", "hf", "static")


class Request(NamedTuple):
    """messages: [{"role", "content"}] ending with a user turn; images: one per `<image>` placeholder."""
    messages: list[dict]
    images: list[Image.Image]


@dataclass
class ReplyOptions:
    """Per-request controls of `InferenceEngine.generate`, and what it reports back about the reply.

    max_new_tokens: this request's budget (None: generate's); stop: strings that end the reply (cut before
    them, like the template's end of turn); on_text: receives the reply's text pieces as they are generated
    (they add up to the returned reply); cancelled: polled while generating, True ends the row (its reply is
    what was generated so far). Written by generate: finish_reason ("stop": an end of turn or a stop string,
    "length": the budget or the context, "cancelled") and n_tokens (tokens generated).
    """
    max_new_tokens: int | None = None
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None
    finish_reason: str | None = field(default=None, init=False)
    n_tokens: int = field(default=0, init=False)


class PromptTooLongError(ValueError):
    """A prompt leaves no room for a reply in the model's context."""

    def __init__(self, n_tokens: int, context_length: int, index: int | None = None):
        self.n_tokens, self.context_length, self.index = n_tokens, context_length, index
        which = f"request {index}: " if index is not None else ""
        super().__init__(f"{which}the prompt has {n_tokens} tokens (images included) but the model's context holds "
                         f"{context_length}, with at least one token needed for the reply")


class QuantizationUnavailable(RuntimeError):
    """--load-4bit/--load-8bit asked for where bitsandbytes cannot run."""


class _ReplyText:
    """One row's reply while it is generated: hands new text to `options.on_text` and tells when the row has
    ended (a stop token, a stop text, or cancellation).

    The whole reply is decoded each time and only its new tail is handed on, so pieces always add up to
    the decoded text; a tail that may still change is held back: an incomplete multi-byte character,
    trailing white space (the reply is stripped), or the beginning of a stop text. Nothing after a stop
    text is handed on.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: ReplyOptions, stop_texts: list[str],
                 stop_token_ids: list[int], watch_texts: bool):
        self.tokenizer, self.options, self.stop_token_ids = tokenizer, options, stop_token_ids
        self.stop_texts = [s for s in [*stop_texts, *options.stop] if s]
        # Decoding every step is needed only to stream, or to find a stop text that is not one token.
        self.watching = options.on_text is not None or options.cancelled is not None or watch_texts \
            or bool(options.stop)
        self.emitted, self.ended, self.cancelled = 0, False, False

    def text(self, token_ids: list[int]) -> tuple[str, bool]:
        """(reply text, whether it has ended) of these new tokens: cut at the first stop token or stop text."""
        stop = next((k for k, t in enumerate(token_ids) if t in self.stop_token_ids), None)
        text = self.tokenizer.decode(token_ids[:stop], skip_special_tokens=True).lstrip()
        cut = min((text.find(s) for s in self.stop_texts if s in text), default=-1)
        return (text[:cut] if cut >= 0 else text), stop is not None or cut >= 0

    def update(self, token_ids: list[int]) -> bool:
        """The row's tokens so far -> whether it has ended; streams what is new."""
        if self.ended:
            return True
        if self.options.cancelled is not None and self.options.cancelled():
            self.ended = self.cancelled = True
            return True
        if not self.watching:
            return False
        text, self.ended = self.text(token_ids)
        if not self.ended:
            if text.endswith("\ufffd"):
                return False
            held = max((k for s in self.stop_texts for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        self._emit(text.rstrip())
        return self.ended

    def finish(self, token_ids: list[int]) -> str:
        """All the row's new tokens -> the reply (stripped); streams the rest and fills in the options' results."""
        text, stopped = self.text(token_ids)
        text = text.strip()
        if not self.cancelled:
            self._emit(text)
        stop = next((k for k, t in enumerate(token_ids) if t in self.stop_token_ids), len(token_ids) - 1)
        self.options.n_tokens = min(len(token_ids), stop + 1)
        self.options.finish_reason = "cancelled" if self.cancelled else "stop" if stopped else "length"
        return text

    def _emit(self, text: str) -> None:
        if self.options.on_text is not None and len(text) > self.emitted:
            self.options.on_text(text[self.emitted:])
            self.emitted = len(text)


class _RowEnds(StoppingCriteria):
    """Ends row i after `budgets[i]` new tokens (its share of the context), or when its _ReplyText says it has
    ended, independently of the batch (generate then pads the row)."""

    def __init__(self, budgets: list[int], replies: list[_ReplyText]):
        self.budgets, self.replies, self.start = budgets, replies, None
        self.lengths = list(budgets)  # the tokens of each row before generate's padding

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.start is None:  # called once per new token: the first call follows the first token
            self.start = input_ids.shape[1] - 1
        generated = input_ids.shape[1] - self.start
        ended = [budget <= generated for budget in self.budgets]
        if any(reply.watching for reply in self.replies):
            rows = input_ids[:, self.start:].tolist()
            for i, (reply, row) in enumerate(zip(self.replies, rows)):
                if not ended[i] and reply.watching and not reply.ended and reply.update(row):
                    ended[i], self.lengths[i] = True, generated
            ended = [done or reply.ended for done, reply in zip(ended, self.replies)]
        return torch.tensor(ended, device=input_ids.device)


class InferenceEngine:
    """A MultimodalLM with its tokenizer, image processor and conversation template, ready to answer.

    `generate` is the only decoding path of the project: chat streams through it with one request, the
    evaluation runs batches through it, the server batches its clients' requests through it.

    decode: "auto" (the static decoder on CUDA, Hugging Face generate otherwise), "static" (always the static
    decoder, with CUDA graphs on CUDA) or "hf" (always generate). Streamed text arrives after every token from
    generate and every `sync_every` (8) tokens from the static decoder. `timings`: set to a `Timings` to record per-phase times.
    """

    def __init__(self, model: MultimodalLM, tokenizer: PreTrainedTokenizerBase, conv_mode: str,
                 image_processor: ImageProcessor | None = None, image_aspect_ratio: str = "pad",
                 decode: str = "auto"):
        if conv_mode not in TEMPLATES:
            raise ValueError(f"--conv-mode {conv_mode!r}: choose one of {TEMPLATES}")
        if decode not in DECODE_MODES:
            raise ValueError(f"--decode {decode!r}: choose one of {DECODE_MODES}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (load it through mm_moslora.model.build)")
        self.model, self.tokenizer, self.conv_mode = model.eval(), tokenizer, conv_mode
        self.image_processor = image_processor or ImageProcessor.for_tower(model.vision, image_aspect_ratio)
        markers = stop_markers(tokenizer, conv_mode)
        self.stop_texts, self.stop_token_ids, self.stop_strings = markers.texts, markers.token_ids, markers.strings
        self.decode = decode
        self.checkpoint_config: CheckpointConfig | None = None  # set when loaded from a checkpoint folder
        self.timings: Timings | None = None
        self._static_decoder: StaticDecoder | None = None
        self._image_pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                        merge: bool = True, conv_mode: str | None = None, quantize: str | None = None,
                        decode: str = "auto") -> "InferenceEngine":
        """Load a training output (see checkpoint.load_checkpoint); conv_mode defaults to the checkpoint's.

        merge: fold the adapters into the base weights and drop the adapter layers (same answers, faster).
        quantize: "4bit" or "8bit" puts the LM's linear layers into bitsandbytes (CUDA only), after the
        adapters are merged; "auto" decoding then uses Hugging Face generate (bitsandbytes kernels are not
        known to be safe in CUDA graphs).
        decode: see the class docstring.
        """
        from ..model.quantize import count_quantized  # a QLoRA adapter checkpoint loads its base quantized

        if quantize is not None:
            check_quantization(quantize, device)
        load_device = "cpu" if quantize else device
        merge = merge or quantize is not None
        model, tokenizer, config = load_checkpoint(path, dtype=dtype, device=load_device, merge=merge)
        if merge:
            unload_adapters(model.llm, merge=True)
        if quantize:
            quantize_llm(model.llm, quantize, parse_dtype(dtype))
            model.to(device)  # bitsandbytes quantizes the weights on their way to the GPU
        engine = cls(model, tokenizer, conv_mode or config.conv_mode, image_aspect_ratio=config.image_aspect_ratio,
                     decode="hf" if (quantize or count_quantized(model.llm)) and decode == "auto" else decode)
        engine.checkpoint_config = config
        return engine

    @property
    def device(self) -> torch.device:
        return self.model.llm.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int:
        return int(self.model.llm.config.max_position_embeddings)

    def decode_path(self) -> str:
        """"static" or "hf": the decoder `generate` uses now (see the class docstring)."""
        if self.decode == "hf":
            return "hf"
        if self.decode == "static":
            return "static"
        supported = self.model.llm.config._attn_implementation in MASK_KINDS
        return "static" if self.device.type == "cuda" and supported else "hf"

    @property
    def static_decoder(self) -> StaticDecoder:
        """The static decoder, built on first use; it keeps caches and CUDA graphs across calls."""
        if self._static_decoder is None:
            self._static_decoder = StaticDecoder(self.model.llm)
        return self._static_decoder

    def prompt_ids(self, messages: list[dict], n_images: int, truncate: bool = False) -> list[int]:
        """Token ids of the generation prompt, each `<image>` expanded to the image-token positions.

        Raises ValueError when placeholders and images disagree, PromptTooLongError when no reply fits
        (with `truncate`, the text between the last image and the end of the prompt is cut from the front
        instead, which drops the oldest turns of a chat).
        """
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if n_placeholders != n_images:
            raise ValueError(f"the messages have {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                             f"but {n_images} images were given")
        ids = build_generation_prompt(messages, self.tokenizer, self.conv_mode, self.model.num_image_tokens)
        limit = self.context_length - 1
        if len(ids) > limit and truncate:
            images_end = max((i + 1 for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID), default=1)
            room = limit - images_end
            if room > 0:
                ids = ids[:images_end] + ids[len(ids) - room:]
        if len(ids) > limit:
            raise PromptTooLongError(len(ids), self.context_length)
        return ids

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request | tuple], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 32, stream: Callable[[str], None] | None = None,
                 truncate: bool = False, options: Sequence[ReplyOptions] | None = None) -> list[str]:
        """Answer each request; returns the replies in input order (stripped, without end-of-turn text).

        Greedy when temperature is 0, else sampling with temperature and nucleus `top_p`. Requests are
        sorted by prompt length into batches of `batch_size` to cut padding. `stream` receives the text
        pieces of a single request as they are generated (Ctrl-C raises KeyboardInterrupt through it);
        `options`, one per request, set budgets, stop strings, streaming and cancellation per request.
        """
        if stream is not None and len(requests) != 1:
            raise ValueError("streaming needs exactly one request")
        if options is not None and len(options) != len(requests):
            raise ValueError(f"{len(options)} options for {len(requests)} requests")
        options = list(options) if options is not None else [ReplyOptions() for _ in requests]
        if stream is not None:
            options[0].on_text = stream
        budgets = [max_new_tokens if o.max_new_tokens is None else o.max_new_tokens for o in options]
        if min(budgets, default=1) < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        prompts = []
        for index, (messages, images) in enumerate(requests):
            try:
                prompts.append(self.prompt_ids(messages, len(images), truncate))
            except PromptTooLongError as err:
                raise PromptTooLongError(err.n_tokens, err.context_length, index) from None
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

        def preprocess(rows: list[int]) -> list[Future]:  # row order = embed's scatter order
            return [self._preprocess_async(img) for i in rows for img in requests[i][1]]
        answers: list[str] = [""] * len(requests)
        upcoming = preprocess(batches[0]) if batches else []
        for index, rows in enumerate(batches):
            pixels, upcoming = upcoming, (preprocess(batches[index + 1]) if index + 1 < len(batches) else [])
            texts = self._generate_rows([prompts[i] for i in rows], [len(requests[i][1]) for i in rows], pixels,
                                        [budgets[i] for i in rows], temperature, top_p, [options[i] for i in rows])
            for i, text in zip(rows, texts):
                answers[i] = text
        return answers

    def _generate_rows(self, prompts: list[list[int]], n_images: list[int], pixels: list[Future], budgets: list[int],
                       temperature: float, top_p: float, options: list[ReplyOptions]) -> list[str]:
        """_generate_batch, halving the batch while the GPU runs out of memory (a default batch size that suits
        an H200 then still runs on a smaller GPU, only slower). n_images: images per prompt, to split `pixels`."""
        try:
            return self._generate_batch(prompts, pixels, budgets, temperature, top_p, options)
        except torch.cuda.OutOfMemoryError:
            if len(prompts) == 1:
                raise
        if self._static_decoder is not None:
            self._static_decoder.slots.clear()  # the caches of the larger batch size go first
        torch.cuda.empty_cache()
        half, split = len(prompts) // 2, sum(n_images[:len(prompts) // 2])
        print(f"[mm_moslora] out of GPU memory at batch size {len(prompts)}: answering it as {half} + "
              f"{len(prompts) - half}", file=sys.stderr, flush=True)
        return (self._generate_rows(prompts[:half], n_images[:half], pixels[:split], budgets[:half], temperature,
                                    top_p, options[:half])
                + self._generate_rows(prompts[half:], n_images[half:], pixels[split:], budgets[half:], temperature,
                                      top_p, options[half:]))

    def _preprocess_async(self, image: Image.Image) -> Future:
        """Image -> future of its (3, S, S) pixels; PIL and torch release the GIL, so threads run in parallel."""
        if self._image_pool is None:
            self._image_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                  thread_name_prefix="preprocess")
        return self._image_pool.submit(self.image_processor, image)

    def _generate_batch(self, prompts: list[list[int]], pixels: list[Future], budgets: list[int],
                        temperature: float, top_p: float, options: list[ReplyOptions]) -> list[str]:
        """One batch: prompts (token ids), the futures of their images' pixels in row order, reply budgets and
        options per row -> reply texts."""
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        with phase(self.timings, "preprocess wait", self.device):
            pixel_values = torch.stack([f.result() for f in pixels]).to(self.device) if pixels else None
        with phase(self.timings, "embed", self.device):
            inputs_embeds = self.model.embed(input_ids.to(self.device), pixel_values)
        budgets = [min(budget, self.context_length - len(p)) for p, budget in zip(prompts, budgets)]
        replies = [_ReplyText(self.tokenizer, o, self.stop_texts, self.stop_token_ids, bool(self.stop_strings))
                   for o in options]
        if self.decode_path() == "static":
            watching = any(reply.watching for reply in replies)
            rows = self.static_decoder.generate(
                inputs_embeds, attention_mask, budgets, self.stop_token_ids, self.tokenizer.pad_token_id,
                temperature, top_p, stop_check=(lambda i, ids: replies[i].update(ids)) if watching else None,
                timings=self.timings)
        else:
            rows = self._generate_hf(inputs_embeds, attention_mask, budgets, temperature, top_p, replies)
        return [reply.finish(row) for reply, row in zip(replies, rows)]

    def _generate_hf(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, budgets: list[int],
                     temperature: float, top_p: float, replies: list[_ReplyText]) -> list[list[int]]:
        """Hugging Face generate: inputs_embeds (B, T, H), attention_mask (B, T) -> new token ids per row."""
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=1.0, top_p=1.0)
        ends = _RowEnds(budgets, replies)
        with phase(self.timings, "hf generate/token", self.device) as generating:
            output = self.model.llm.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(self.device),
                max_new_tokens=max(budgets), num_beams=1, use_cache=True, eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([ends]), **sampling)
            generating.count = output.shape[1]  # one count per token step, as the static decoder counts
        return [row[:length].tolist() for row, length in zip(output, ends.lengths)]

    def _decode(self, token_ids: list[int]) -> str:
        """New tokens of one row -> reply text, cut at the first stop token or end-of-turn text."""
        return _ReplyText(self.tokenizer, ReplyOptions(), self.stop_texts, self.stop_token_ids, False).text(
            token_ids)[0].strip()


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts -> (input_ids (B, T), attention_mask (B, T)), padded on the left so that every prompt ends
    where generation starts."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def check_quantization(mode: str, device: str | torch.device) -> None:
    """Raise QuantizationUnavailable unless `mode` can run here (bitsandbytes installed, CUDA device)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise QuantizationUnavailable(f"--load-{mode} needs a CUDA GPU (bitsandbytes); use --device cuda on a GPU "
                                      f"machine, or drop --load-{mode}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise QuantizationUnavailable(f"--load-{mode} needs bitsandbytes: pip install bitsandbytes ({err})") from None


def quantize_llm(llm: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> None:
    """Swap the LM's nn.Linear layers (not lm_head) for bitsandbytes NF4 / int8 ones, in place, on the CPU.

    The weights are quantized when the model is moved to the GPU afterwards (bitsandbytes does it in `.cuda()`).
    """
    import bitsandbytes as bnb

    for name, module in list(llm.named_modules()):
        if type(module) is not torch.nn.Linear or name.split(".")[-1] == "lm_head":
            continue
        has_bias = module.bias is not None
        if mode == "4bit":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=has_bias,
                                      compute_dtype=compute_dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        llm.set_submodule(name, layer)
