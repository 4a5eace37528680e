"""A fast decode loop for a Hugging Face causal LM: static KV cache, fixed-shape steps, CUDA graphs.

Hugging Face's `generate` is launch-bound for a 7B model (~25-45 ms per step at batch 1 and at batch 16
while the GPU needs ~3-5 ms) and its DynamicCache concatenates every step. `StaticDecoder` instead:

- prefills eagerly into a transformers `StaticCache` of `max_cache_len` L (the prompt width plus the
  reply budget, rounded up to `bucket`), with position ids counted from each row's first real token
  (left padding does not shift positions, as in `generate`);
- runs every further token as one step with fixed shapes: token ids (B, 1), position ids (B, 1) and a
  4D attention mask (B, 1, 1, L) derived from a (B, L) "valid key" buffer (transformers passes a 4D
  mask through untouched, so no data-dependent mask code runs). On CUDA that step is captured once in a
  `torch.cuda.CUDAGraph` and replayed;
- keeps the cache, buffers and graph of the last few (B, L) keys, so evaluating many batches of one
  shape captures once;
- picks tokens on the device (greedy, or temperature + top-p sampling) and tracks each row's budget and
  stop tokens in device tensors, reading "all rows finished" back only every `sync_every` steps.

Multi-token end-of-turn texts (and a caller's own stop strings or cancellation) are checked at those sync
points by the caller's `stop_check` on the tokens so far, which may also stream them; a row found finished
there has generated a few tokens past its end-of-turn text, which the caller cuts from the decoded text, so
the answer is the same as stopping at once.
"""
from __future__ import annotations

import inspect
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import StaticLayer

# Attention implementations whose forward takes a ready 4D mask: sdpa a boolean one, eager an additive one.
MASK_KINDS = ("sdpa", "eager")


class CudaGraphCaptureError(RuntimeError):
    """The one-token decode step could not be captured in a CUDA graph."""


class Timings:
    """Seconds and counts per phase, summed over calls (for benchmarks). A phase ends with a device
    synchronize, so its GPU work is counted in it; the engine and the decoder record only when given one."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def summary(self) -> str:
        """One line per phase: total seconds, count, milliseconds per count."""
        return "\n".join(f"{phase:>18s}: {seconds:8.3f} s / {self.counts[phase]:6d} = "
                         f"{1000 * seconds / max(self.counts[phase], 1):8.3f} ms each"
                         for phase, seconds in self.seconds.items())


class phase:
    """`with phase(timings, name, device) as p: ...` adds the block's time to `timings` (a no-op when timings is
    None); set `p.count` inside the block when it covers several steps."""

    def __init__(self, timings: Timings | None, name: str, device: torch.device):
        self.timings, self.name, self.device, self.count = timings, name, device, 1

    def __enter__(self) -> "phase":
        if self.timings is not None:
            _synchronize(self.device)
            self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.timings is not None and exc_type is None:
            _synchronize(self.device)
            self.timings.seconds[self.name] += time.perf_counter() - self.started
            self.timings.counts[self.name] += self.count


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Slot:
    """The decoding state of one (batch size B, cache length L) key, reused by every batch of that key.

    cache: StaticCache of L positions; valid: (B, L) bool, True at the keys a row may attend to;
    token / position: (B, 1) long inputs of the next step; write_at: (1,) long, the cache position the
    next step writes (the StaticCache's own counter moves in step with it); logits: (B, V) output of
    the last step (a graph's static output once captured).
    """

    def __init__(self, llm: torch.nn.Module, batch_size: int, cache_len: int, device: torch.device):
        self.llm, self.device = llm, device
        self.cache = StaticCache(config=llm.config, max_cache_len=cache_len)
        self.valid = torch.zeros(batch_size, cache_len, dtype=torch.bool, device=device)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name still works, with a warning).
        self.cache_arg = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"

    def attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: (B, 1, Q, L) bool -> the mask the model's attention takes (boolean, or additive for eager)."""
        if self.llm.config._attn_implementation == "sdpa":
            return allowed
        dtype = self.llm.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """inputs_embeds: (B, T, H), attention_mask: (B, T) left-padded -> logits of the last position (B, V).

        Resets the cache, writes the prompt's keys and values at positions 0..T-1 and sets the buffers for
        the first step.
        """
        width = inputs_embeds.shape[1]
        self.cache.reset()
        self.valid.zero_()
        self.valid[:, :width] = attention_mask.bool()
        lengths = attention_mask.sum(dim=1, keepdim=True)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        # Query q sees the valid keys up to q; padding queries see themselves, so that no row of the
        # softmax is empty (an empty one is NaN in some kernels, and NaN values would poison the cache).
        key = torch.arange(self.valid.shape[1], device=self.device)
        query = torch.arange(width, device=self.device)[:, None]
        allowed = (self.valid[:, None, None, :] & (key <= query)) | (key == query)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=self.attention_mask(allowed),
                       position_ids=positions, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        self.position.copy_(lengths)
        self.write_at.fill_(width)
        return out.logits[:, -1]

    def step(self) -> torch.Tensor:
        """One token per row: reads `token`, `position`; writes the cache at `write_at`; -> logits (B, V).

        Only device ops with fixed shapes and no host reads, so the same code runs eagerly and in a graph.
        """
        self.valid.index_fill_(1, self.write_at, True)
        out = self.llm(input_ids=self.token, attention_mask=self.attention_mask(self.valid[:, None, None, :]),
                       position_ids=self.position, use_cache=True, **{self.cache_arg: self.cache})
        self.position.add_(1)
        self.write_at.add_(1)
        return out.logits[:, -1]

    def capture(self, warmup_steps: int = 3) -> None:
        """Capture `step` in a CUDA graph (warm-up on a side stream first, as torch.cuda.graphs asks).

        Warm-up steps fill the lazily allocated cache and write junk keys, which the next prefill's
        reset clears.
        """
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup_steps):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (e.g. a data loader's) do not invalidate the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self.step()
        except Exception as err:
            self.graph = None
            raise CudaGraphCaptureError(
                f"capturing the decode step of {type(self.llm).__name__} in a CUDA graph failed ({err}); "
                f"decode with Hugging Face generate instead (decode='hf', or --decode hf)") from err

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.logits


class StaticDecoder:
    """Batched decoding of `llm` over static caches; `use_cuda_graph` defaults to True on CUDA.

    bucket: the cache length L is the prompt width plus the largest budget rounded up to a multiple of
    this (fewer distinct keys, fewer captures). max_slots: how many (B, L) keys keep their cache and
    graph (each holds B x L keys and values of every layer); the least recently used is dropped.
    """

    def __init__(self, llm: torch.nn.Module, use_cuda_graph: bool | None = None, bucket: int = 128,
                 max_slots: int = 3, sync_every: int = 8):
        attn = llm.config._attn_implementation
        if attn not in MASK_KINDS:
            raise ValueError(f"static decoding needs attention that takes a 4D mask ({', '.join(MASK_KINDS)}), "
                             f"the model uses {attn!r}; decode with Hugging Face generate (decode='hf')")
        self.llm, self.bucket, self.max_slots, self.sync_every = llm, bucket, max_slots, sync_every
        self.device = llm.get_input_embeddings().weight.device
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()

    def cache_len(self, width: int, max_budget: int) -> int:
        """L for prompts of `width` tokens and replies of up to `max_budget` tokens."""
        return -(-(width + max_budget) // self.bucket) * self.bucket

    def _slot(self, batch_size: int, cache_len: int, timings: Timings | None) -> _Slot:
        key = (batch_size, cache_len)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.max_slots:  # free the old cache before allocating the new one
            self.slots.popitem(last=False)
        slot = _Slot(self.llm, batch_size, cache_len, self.device)
        if any(type(layer) is not StaticLayer for layer in slot.cache.layers):
            raise ValueError("static decoding supports full-attention layers only (no sliding window or linear "
                             "attention); decode with Hugging Face generate (decode='hf')")
        if self.use_cuda_graph:
            with phase(timings, "graph capture", self.device):
                slot.capture()
        self.slots[key] = slot
        return slot

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, budgets: Sequence[int],
                 stop_token_ids: Sequence[int], pad_token_id: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_check: Callable[[int, list[int]], bool] | None = None, timings: Timings | None = None,
                 ) -> list[list[int]]:
        """New token ids of each row, ending with its stop token when it met one.

        inputs_embeds: (B, T, H) left-padded prompts; attention_mask: (B, T), 0 at padding; budgets: at
        most budgets[i] new tokens for row i; greedy when temperature is 0, else sampled from the global
        torch generator (seed it for reproducible draws). stop_check(row index, tokens of that row so far) ->
        True when the row has ended (a multi-token end-of-turn text, a cancelled request); it runs at the sync
        points only, for the rows not finished yet (a caller may stream their text from there).
        """
        batch_size, width = attention_mask.shape
        max_budget = max(budgets)
        attention_mask = attention_mask.to(self.device)
        slot = self._slot(batch_size, self.cache_len(width, max_budget), timings)
        warpers = []
        if temperature > 0:  # the order of Hugging Face's sampling: temperature, then nucleus
            warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
            if not warpers:
                return logits.argmax(dim=-1)
            scores = logits.float()
            for warper in warpers:
                scores = warper(None, scores)
            return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)

        tokens = torch.full((batch_size, max_budget), pad_token_id, dtype=torch.long, device=self.device)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        budget_t = torch.tensor(list(budgets), device=self.device)
        stop_t = torch.tensor(list(stop_token_ids), dtype=torch.long, device=self.device)

        def accept(index: int, token: torch.Tensor) -> None:  # token: (B,); finished rows keep their tokens
            tokens[:, index] = torch.where(finished, pad_token_id, token)
            lengths.add_((~finished).long())
            # A broadcast compare (a few stop ids) rather than isin, whose sorting path may sync with the host.
            finished.logical_or_((token[:, None] == stop_t).any(dim=1) | (lengths >= budget_t))

        with phase(timings, "prefill", self.device):
            accept(0, pick(slot.prefill(inputs_embeds, attention_mask)))
        with phase(timings, "decode step", self.device) as decoding:
            decoding.count = 0
            for index in range(1, max_budget):
                if index % self.sync_every == 0 and self._all_finished(tokens[:, :index], lengths, finished,
                                                                       stop_check):
                    break
                slot.token.copy_(tokens[:, index - 1:index])
                accept(index, pick(slot.run()))
                decoding.count += 1
        return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]

    @staticmethod
    def _all_finished(tokens: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor,
                      stop_check: Callable[[int, list[int]], bool] | None) -> bool:
        """The one host sync of `sync_every` steps; with stop_check, also marks rows ended by it."""
        if stop_check is not None:
            rows = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
            ended = [not done and stop_check(i, row) for i, (row, done) in enumerate(zip(rows, finished.tolist()))]
            finished.logical_or_(torch.tensor(ended, device=finished.device))
        return bool(finished.all())
