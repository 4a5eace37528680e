"""lmms-eval model `mm_moslora`: evaluate a training output on lmms-eval's benchmarks.

    lmms-eval --model mm_moslora --model_args pretrained=CKPT[,device=cuda,dtype=bf16,batch_size=32] --tasks pope,...
    (or `python -m lmms_eval ...`; several GPUs: `accelerate launch --num_processes N -m lmms_eval ...`)

Registration. lmms-eval (>= 0.6) builds its model registry when `lmms_eval.models` is first imported: its
built-in models, then every Python entry point of the group `lmms_eval.models`, whose object is a
`ModelManifest` or a callable returning one. mm_moslora's pyproject.toml declares

    [project.entry-points."lmms_eval.models"]
    mm_moslora = "mm_moslora.integrations:lmms_eval_manifest"

so installing mm_moslora (`pip install -e ".[eval]"`) is all it takes: `--model mm_moslora` resolves to
`MMMoSLoRA` (`lmms_eval.models.list_available_models()` has it; the `lmms-eval models` listing shows only
built-in names). The entry point's function lives in `mm_moslora.integrations`, which imports nothing
heavy: lmms-eval loads every entry point whenever `lmms_eval.models` is imported. The other mechanisms
are not used: the `register_model` decorator fills a legacy dict that `--model` no longer reads, and the
env var LMMS_EVAL_PLUGINS is deprecated (it wants `<package>.models.<name>` and `<package>.tasks` modules).

Model args (`--model_args k=v,...`): `pretrained` (checkpoint folder), `device` (default cuda when
available; with several processes each takes cuda:LOCAL_RANK), `dtype` (default bf16 on cuda, else fp32),
`batch_size` (default 32), `merge`, `conv_mode`, `quantize` ("4bit"/"8bit"), `truncate` (cut over-long
prompts instead of failing). Values in --model_args win over lmms-eval's --batch_size/--device flags.

Requests are answered by `InferenceEngine` (the project's only decoding path), so answers equal those of
eval/run_vqa.py and the chat CLI for the same prompt:
- generate_until: the images are `doc_to_visual(doc)` (PIL images). As in lmms-eval's `llava` model, a
  context without `<image>` gets one `<image>` per image (joined by spaces) and a newline in front; a
  context with placeholders keeps them. gen_kwargs: `max_new_tokens` (default 1024), `temperature` (0 =
  greedy), `top_p`, `do_sample` (false forces greedy), `num_beams` (only 1), `until` (the reply is cut at
  the first of these strings; the engine itself stops at the template's end of turn).
- generate_until_multi_round: lmms-eval's round protocol (`doc_to_text(doc, previous_output, round_idx,
  previous_round_info)` gives each next round), one document at a time.
- loglikelihood: log P(continuation | context) with the continuation as the assistant's reply, rendered by
  the conversation template as in training (cut before its end-of-turn text), from one forward pass.
"""
from __future__ import annotations

import os

import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ..data.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Rendered, render, tokenize_rendered
from ..infer import InferenceEngine, PromptTooLongError, Request

DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava model uses the same when a task sets none
HANDLED_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams"}


def place_images(context: str, n_images: int) -> str:
    """The user turn for `context` with `n_images` images, placed as lmms-eval's llava model does."""
    if n_images and IMAGE_PLACEHOLDER not in context:
        return " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
    return context


def generation_settings(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """lmms-eval gen_kwargs -> (InferenceEngine.generate keywords, `until` strings). Does not modify gen_kwargs."""
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise NotImplementedError(f"num_beams={gen_kwargs['num_beams']}: mm_moslora decodes greedily or by sampling, "
                                  f"not by beam search")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is True and gen_kwargs.get("temperature") is None:
        temperature = 1.0  # Hugging Face's default temperature when sampling
    if gen_kwargs.get("do_sample") is False or temperature <= 0:
        temperature, top_p = 0.0, 1.0
    else:
        top_p = 1.0 if gen_kwargs.get("top_p") is None else float(gen_kwargs["top_p"])
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] when sampling")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    settings = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                    temperature=temperature, top_p=top_p)
    return settings, [u for u in until if u]


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings."""
    for marker in until:
        text = text.split(marker, 1)[0]
    return text.strip()


def resolve_device(device: str | None) -> torch.device:
    """None -> cuda when available, else cpu. Under a multi-process launcher (WORLD_SIZE > 1), a bare
    "cuda" becomes this process's GPU, cuda:LOCAL_RANK: lmms-eval shards the documents over the processes."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class MMMoSLoRA(lmms):
    """An mm_moslora checkpoint as an lmms-eval model (a "simple" model: prompts come as text + doc_to_visual)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None, batch_size: int | str = 32,
                 merge: bool = True, conv_mode: str | None = None, quantize: str | None = None,
                 truncate: bool = False) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number (batch_size=auto is not supported)")
        self._device = resolve_device(device)
        dtype = dtype or ("bf16" if self._device.type == "cuda" else "fp32")
        self.engine = InferenceEngine.from_checkpoint(str(pretrained), device=self._device, dtype=dtype, merge=merge,
                                                      conv_mode=conv_mode, quantize=quantize)
        self.batch_size_per_gpu = int(batch_size)
        self.truncate = bool(truncate)
        self.warned_gen_kwargs: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MMMoSLoRA":
        """--model_args win over the CLI's values: lmms-eval always passes --batch_size (default 1), which would
        otherwise clash with `batch_size=` in --model_args. --max_batch_size (for batch_size=auto) is dropped."""
        defaults = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "max_batch_size"}
        return cls(**{**defaults, **utils.simple_parse_args_string(arg_string)})

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---- documents -> engine requests ------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _images(visuals, where: str) -> list[Image.Image]:
        """doc_to_visual's result -> list of PIL images ([] for a text-only document)."""
        if visuals is None:
            return []
        if isinstance(visuals, Image.Image):
            visuals = [visuals]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(f"{where}: doc_to_visual gave a {type(visual).__name__}; mm_moslora answers from "
                                 f"images only (video and audio tasks are not supported)")
        return list(visuals)

    def _request(self, context: str, visuals, where: str) -> Request:
        images = self._images(visuals, where)
        question = place_images(context, len(images))
        if question.count(IMAGE_PLACEHOLDER) != len(images):
            raise ValueError(f"{where}: the context has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                             f"placeholders but doc_to_visual gave {len(images)} images")
        return Request([{"role": "user", "content": question}], images)

    def _generate(self, requests: list[Request], settings: dict, where: list[str]) -> list[str]:
        try:
            return self.engine.generate(requests, batch_size=self.batch_size, truncate=self.truncate, **settings)
        except PromptTooLongError as err:
            raise ValueError(f"{where[err.index]}: {err} (truncate=True in --model_args cuts such prompts)") from None

    def _settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        unknown = set(gen_kwargs) - HANDLED_GEN_KWARGS - self.warned_gen_kwargs
        if unknown:
            logger.warning(f"mm_moslora ignores these generation kwargs: {sorted(unknown)}")
            self.warned_gen_kwargs |= unknown
        return generation_settings(gen_kwargs)

    # ---- lmms-eval's request types --------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Instance.args: (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> one reply each.

        Requests with the same generation settings are answered together, longest context first, one engine
        batch of `batch_size` at a time (only that batch's images are in memory).
        """
        groups: dict[tuple, list[int]] = {}
        untils: list[list[str]] = []
        for index, request in enumerate(requests):
            settings, until = self._settings(request.args[1])
            groups.setdefault(tuple(sorted(settings.items())), []).append(index)
            untils.append(until)
        answers: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for key, indices in groups.items():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                where, engine_requests = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    where.append(f"task {task!r} doc {doc_id}")
                    engine_requests.append(self._request(context, doc_to_visual(self._doc(task, split, doc_id)),
                                                         where[-1]))
                for i, reply in zip(batch, self._generate(engine_requests, dict(key), where)):
                    context, gen_kwargs = requests[i].args[:2]
                    answers[i] = cut_at(reply, untils[i])
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[i])
                progress.update(len(batch))
        progress.close()
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Instance.args: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split) -> the replies
        of every round. Round 0 asks `context` with doc_to_visual's images; after each round,
        `doc_to_text(doc, previous_output=replies, round_idx=k, previous_round_info=info)` returns
        (images, next context, stop, replies, info); the document is done when `stop` is true.
        """
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Responding"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            where = f"task {task!r} doc {doc_id}"
            settings, until = self._settings(gen_kwargs)
            doc = self._doc(task, split, doc_id)
            visuals, replies, info, round_idx = doc_to_visual(doc), [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, stop, replies, info = doc_to_text(
                        doc, previous_output=replies, round_idx=round_idx, previous_round_info=info)
                    replies = list(replies)
                    if stop:
                        break
                reply = self._generate([self._request(context, visuals, where)], settings, [where])[0]
                replies.append(cut_at(reply, until))
                round_idx += 1
            self.cache_hook.add_partial("generate_until_multi_round", (request.args[0], gen_kwargs), replies)
            results.append(replies)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Instance.args: (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or
        (context, continuation) without images -> (sum of the continuation's token log-probs, whether greedy
        decoding would produce exactly those tokens)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows, images = [], []
            for i in batch:
                context, target, visuals, where = self._loglikelihood_args(requests[i])
                request = self._request(context, visuals, where)
                rows.append(self._scoring_ids(request, target, where))
                images.append(request.images)
            for i, result in zip(batch, self._score(rows, images)):
                results[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], result)
            progress.update(len(batch))
        progress.close()
        return results

    # ---- log-likelihood --------------------------------------------------------------------------------

    def _loglikelihood_args(self, request: Instance) -> tuple[str, str, list | None, str]:
        if len(request.args) == 2:  # lmms-eval's unconditional requests for acc_mutual_info
            return request.args[0], request.args[1], None, f"task {request.task_name!r} doc {request.doc_id}"
        context, target, doc_to_visual, doc_id, task, split = request.args
        doc = self._doc(task, split, doc_id)
        if callable(target):  # output_type loglikelihood passes the task's doc_to_target
            target = target(doc)
        if not isinstance(target, str):
            raise ValueError(f"task {task!r} doc {doc_id}: the continuation must be a string, got {target!r}")
        return context, target, doc_to_visual(doc), f"task {task!r} doc {doc_id}"

    def _scoring_ids(self, request: Request, continuation: str, where: str) -> tuple[list[int], int]:
        """(prompt + continuation token ids, number of prompt tokens before the continuation).

        The continuation is rendered as the assistant's reply by the conversation template, exactly as in
        training, and cut before the template's end-of-turn text. Its leading whitespace (lm-eval's target
        delimiter " ") is dropped: the template writes its own separator before a reply.
        """
        engine = self.engine
        reply = continuation.lstrip()
        messages = request.messages + [{"role": "assistant", "content": reply}]
        rendered = render(messages, engine.tokenizer, engine.conv_mode)
        start = rendered.reply_spans[-1][0]
        end = rendered.text.index(reply.strip(), start) + len(reply.strip())  # templates may trim a reply
        ids, labels = tokenize_rendered(Rendered(rendered.text[:end], [(start, end)]), engine.tokenizer,
                                        engine.model.num_image_tokens)
        n_context = next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        if n_context == 0:
            raise ValueError(f"{where}: the continuation starts the sequence; nothing conditions its first token")
        if len(ids) > engine.context_length:
            raise ValueError(f"{where}: {PromptTooLongError(len(ids), engine.context_length)}")
        return ids, n_context

    @torch.inference_mode()
    def _score(self, rows: list[tuple[list[int], int]], images: list[list[Image.Image]]) -> list[tuple[float, bool]]:
        """One forward pass over left-padded rows; only the last positions go through the LM head.

        Row r is ids (T_r,) whose last T_r - n_r tokens are the continuation. Position ids come from the
        attention mask, so padding does not shift positions and each row scores as it would alone.
        """
        engine = self.engine
        width = max(len(ids) for ids, _ in rows)
        keep = max(len(ids) - n for ids, n in rows) + 1  # logits at the last `keep` positions predict every continuation
        input_ids = torch.full((len(rows), width), engine.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, _) in enumerate(rows):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        flat_images = [img for row_images in images for img in row_images]
        pixel_values = (torch.stack([engine.image_processor(img) for img in flat_images]).to(engine.device)
                        if flat_images else None)
        inputs_embeds = engine.model.embed(input_ids.to(engine.device), pixel_values)
        logits = engine.model.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(engine.device),
                                  position_ids=position_ids.to(engine.device), logits_to_keep=keep,
                                  use_cache=False).logits                          # (B, keep, vocab)
        logprobs = logits.float().log_softmax(-1)
        results = []
        for row, (ids, n_context) in enumerate(rows):
            n_cont = len(ids) - n_context
            if n_cont == 0:
                results.append((0.0, True))
                continue
            target = torch.tensor(ids[n_context:], device=logprobs.device)
            predicted = logprobs[row, keep - 1 - n_cont:keep - 1]                 # (n_cont, vocab)
            results.append((float(predicted.gather(-1, target[:, None]).sum()),
                            bool((predicted.argmax(-1) == target).all())))
        return results
