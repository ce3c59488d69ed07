"""The decode loop: one scheduler thread admits waiting requests (prefill, one
sequence at a time), then steps every active sequence together in one batched
forward per token. Each sequence streams events to its own queue."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from m2cache.errors import InvalidArgument, M2CacheError, ResourceExhausted
from m2cache.model.generate import Sampling, sample
from m2cache.model.model import CausalLM
from m2cache.worker.compute import ComputeThread
from m2cache.worker.detokenize import Detokenizer
from m2cache.worker.provider import CachedProvider, Choose, DenseProvider

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    full_precision: bool = False


@dataclass(slots=True)
class Event:
    kind: str  # "token" | "done" | "error"
    token_id: int = 0
    text: str = ""
    finish_reason: str = ""
    error: Exception | None = None


@dataclass
class Sequence:
    request: Request
    choose: Choose
    detok: Detokenizer
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    finish_reason: str = ""

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Owns the model, KV cache and provider; ``submit`` is thread-safe."""

    def __init__(self, model: CausalLM, provider: CachedProvider | DenseProvider, tokenizer, max_batch: int,
                 max_queue: int, queue_timeout_s: float, max_context: int, attention=None,
                 compute: ComputeThread | None = None):
        """``attention``: the source of streamed layers' attention weights (dense_stream), if any;
        ``compute``: the thread the model was built on, which the loop then runs on (worker/compute.py;
        else a thread of its own)."""
        self.model = model
        self.provider = provider
        self.attention = attention
        self.tokenizer = tokenizer
        self.max_context = max_context or model.config.max_position_embeddings
        self.kv = model.new_cache(max_batch, max_len=self.max_context)
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.eos = set(model.config.eos_token_ids)
        self._waiting: list[Sequence] = []
        self._active: list[Sequence] = []
        self._cond = threading.Condition()
        self._stop = False
        self.requests = 0
        self.tokens = 0
        self._own_compute = compute is None
        self._compute = compute or ComputeThread()
        self._loop_done = self._compute.submit(self._loop)

    # ---- API -----------------------------------------------------------------------
    def submit(self, request: Request, choose: Choose) -> Sequence:
        self._validate(request)
        seq = Sequence(request, choose, Detokenizer(self.tokenizer, request.prompt_ids, request.stop),
                       generator=request.sampling.generator(torch.device("cpu")))
        with self._cond:
            if len(self._waiting) >= self.max_queue + self.kv.num_free:  # free slots take new work at once
                raise ResourceExhausted(f"worker busy: {len(self._active)} active and {len(self._waiting)} queued requests")
            self._waiting.append(seq)
            self.requests += 1
            self._cond.notify()
        return seq

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        try:
            self._loop_done.result(timeout=10)
        except TimeoutError:
            log.warning("the decode loop did not stop within 10 s")
        except Exception:  # it died earlier: its sequences were failed then
            log.exception("the decode loop had failed")
        if self._own_compute:
            self._compute.close()
        self.provider.close()

    @property
    def num_active(self) -> int:
        return len(self._active) + len(self._waiting)

    def _validate(self, r: Request) -> None:
        if not r.prompt_ids:
            raise InvalidArgument("empty prompt")
        if r.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens must be >= 1")
        vocab = self.model.config.vocab_size
        if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if len(r.prompt_ids) + r.max_new_tokens > self.max_context:
            raise InvalidArgument(
                f"prompt ({len(r.prompt_ids)} tokens) + max_new_tokens ({r.max_new_tokens}) exceed the context length {self.max_context}")

    # ---- the loop --------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        compute = self._compute
        compute.waker = self._wake  # other tensor work (a cache fill, a warm-up) runs between steps
        try:
            self._serve_loop(compute)
        finally:
            compute.waker = None
            compute.run_pending()

    def _serve_loop(self, compute: ComputeThread) -> None:
        while True:
            compute.run_pending()
            with self._cond:
                while not self._stop and not self._waiting and not self._active and not compute.has_pending():
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    break
                admit = self._take_admissible()
            for seq in admit:
                self._guard([seq], self._prefill, seq)
            self._drop_finished()
            if self._active:
                self._guard(list(self._active), self._decode_step)
                self._drop_finished()
        for seq in self._waiting + self._active:
            self._finish(seq, "error", error=M2CacheError("worker shutting down"))

    def _take_admissible(self) -> list[Sequence]:
        """Waiting sequences that get a KV slot now; those waited too long are refused."""
        now = time.monotonic()
        admit, keep = [], []
        for seq in self._waiting:
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
            elif self.kv.num_free > len(admit):
                admit.append(seq)
            elif now - seq.submitted > self.queue_timeout_s:
                self._finish(seq, "error", error=ResourceExhausted(f"no decode slot within {self.queue_timeout_s:.0f}s"))
            else:
                keep.append(seq)
        self._waiting = keep
        return admit

    def _guard(self, seqs: list[Sequence], fn, *args) -> None:
        """Run a step; on failure end the step's sequences with the error, keep the worker up."""
        try:
            fn(*args)
        except Exception as err:  # the request fails, the worker does not
            log.warning("step failed for %d sequence(s): %s", len(seqs), err)
            for seq in seqs:
                self._finish(seq, "error", error=err)

    def _prefill(self, seq: Sequence) -> None:
        seq.slot = self.kv.allocate()
        seq.started = time.monotonic()
        self._active.append(seq)
        ids = torch.tensor([seq.request.prompt_ids])
        self.provider.begin_step([seq.choose])
        logits = self.model.forward(ids, self.kv, [seq.slot], self.provider, self.attention)  # [1, T, V]
        self._emit(seq, int(sample(logits[:, -1], seq.request.sampling, seq.generator)))

    def _decode_step(self) -> None:
        seqs = [s for s in self._active if not s.finish_reason]
        tokens = torch.tensor([[s.generated[-1]] for s in seqs])  # [B, 1]
        self.provider.begin_step([s.choose for s in seqs])
        logits = self.model.forward(tokens, self.kv, [s.slot for s in seqs], self.provider, self.attention)  # [B, 1, V]
        for b, seq in enumerate(seqs):
            self._emit(seq, int(sample(logits[b : b + 1, -1], seq.request.sampling, seq.generator)))

    def _emit(self, seq: Sequence, token: int) -> None:
        if not seq.first_token_at:
            seq.first_token_at = time.monotonic()
        seq.generated.append(token)
        self.tokens += 1
        text, stopped = seq.detok.push(token)
        seq.events.put(Event("token", token, text))
        if seq.cancelled.is_set():
            self._finish(seq, "cancelled")
        elif stopped:
            self._finish(seq, "stop")
        elif token in self.eos:
            self._finish(seq, "eos")
        elif len(seq.generated) >= seq.request.max_new_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        if seq.finish_reason:
            return
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        if seq.slot >= 0:  # free the KV slot before the client hears "done": it may send the next request at once
            self.kv.free(seq.slot)
            seq.slot = -1
        if error is not None:
            seq.events.put(Event("error", error=error))
        else:  # text held back for a possible stop string or a split character
            tail = seq.detok.flush() if reason != "stop" else ""
            seq.events.put(Event("done", text=tail, finish_reason=reason))

    def _drop_finished(self) -> None:
        for seq in [s for s in self._active if s.finish_reason or s.cancelled.is_set()]:
            if not seq.finish_reason:
                self._finish(seq, "cancelled")
            self._active.remove(seq)
