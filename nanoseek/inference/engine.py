"""Continuous batching: requests join and leave between decode steps, each with its own settings.

How to drive it (this is what `nanoseek.generate` and the server do):

    engine = Engine(model, max_batch_size=8, max_cached_tokens=16384)
    engine.start()                                   # a background thread steps while there is work
    req = engine.submit([1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                        max_new_tokens=64, stop_token_ids=[1], on_event=callback)
    for tokens in req:                               # blocks; yields each step's new token ids
        ...
    req.tokens, req.finish_reason, req.usage         # "stop", "length", "cancelled" or "error"
    engine.cancel(req)                               # or req.cancel(); the slot is freed next step
    engine.stats()                                   # queue length, running batch size, totals
    engine.stop()

Without start(), call `engine.step()` yourself (one admission + one decode step) or
`engine.run_until_done()`. `submit`, `cancel` and `stats` are thread-safe and may be called from
any thread (e.g. the server's event loop) while the engine thread steps; `on_event(event)` is
called on the engine thread, so an asyncio caller forwards it with loop.call_soon_threadsafe.
Stop tokens end a request and are not included in its tokens. `stop` is an optional callable
given the tokens so far and returning True to end the request (stop strings live in the text
layer: see `nanoseek.inference.text.StopStrings`).

Scheduling: FIFO. A waiting request is admitted when a slot is free (max_batch_size) and the tokens
it may occupy (prompt + max_new_tokens + draft tokens) fit in what is left of max_cached_tokens;
the head of the queue is never overtaken, so no request starves. Running requests sit in cache
slots 0..B-1; when one leaves, the last one moves into its slot (a copy of its cache rows), so a
step always works on one contiguous block of the cache.

Each step the host reads one (B,) tensor of sampled ids (or, when speculating, the accepted counts
and tokens): no other host sync.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.transformer import DeepSeekModel
from ..model.vision import VisionConfig, image_token_count
from .cache import LatentCache
from .decode import decode_step, prefill, run_step
from .forward import CacheView
from .sampling import SamplingBatch, SamplingParams
from .speculative import speculative_step

ATTEND_BLOCK = 64  # attended length grows in blocks, so most steps see the same shapes


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against when it is submitted. Plain data (it pickles), so a server
    whose engine runs in another process refuses a bad request at once, as the engine itself would."""

    vocab_size: int
    max_seq_len: int
    max_cached_tokens: int
    draft_tokens: int
    eos_token_ids: tuple[int, ...]
    image_token_id: int | None = None
    vision: VisionConfig | None = None  # None: the model takes no images

    def check(self, prompt: list[int], max_new_tokens: int, stop_token_ids=None, images: list | None = None) -> list[int]:
        """Raise ValueError naming what is wrong; return the stop token ids (None: the model's eos ids)."""
        V = self.vocab_size
        if not prompt:
            raise ValueError("prompt is empty: give at least one token id")
        if not all(isinstance(t, int) and 0 <= t < V for t in prompt):
            bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < V))
            raise ValueError(f"prompt token {bad!r} is not an integer id in [0, {V})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        need = len(prompt) + max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds "
                             f"max_seq_len ({self.max_seq_len})")
        if need + self.draft_tokens > self.max_cached_tokens:
            raise ValueError(f"request needs {need + self.draft_tokens} cached tokens, more than max_cached_tokens "
                             f"({self.max_cached_tokens})")
        stop_ids = list(self.eos_token_ids) if stop_token_ids is None else list(stop_token_ids)
        if not all(isinstance(t, int) for t in stop_ids):
            raise ValueError(f"stop_token_ids must be integers, got {stop_ids!r}")
        self.check_images(prompt, images or [])
        return stop_ids

    def check_images(self, prompt: list[int], images: list) -> None:
        """The prompt must hold exactly the image-token runs its images fill, and the model must see images.

        For a vision model this holds for text-only prompts too (none): a stray image_token_id would
        fail the whole batch at prefill, not just its own request. A text model's prompts may hold
        that id as any other token."""
        if self.vision is None:
            if images:
                raise ValueError("this model has no vision encoder (its config has no vision_config), so it takes no images")
            return
        v = self.vision
        for image in images:  # a malformed one would fail the whole batch at prefill, not just this request
            rows, cols = image.tiles
            if rows < 0 or cols < 0 or tuple(image.views.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
                raise ValueError(f"an image of views {tuple(image.views.shape)} and tiles {image.tiles} is not this "
                                 f"model's ({v.num_channels}, {v.image_size}, {v.image_size}) views with tiles >= 0; "
                                 "preprocess it with nanoseek.image.preprocess")
        slots = sum(1 for t in prompt if t == self.image_token_id)
        needed = sum(image_token_count(self.vision, image.tiles) for image in images)
        if slots and not images:
            raise ValueError(f"the prompt holds {slots} image-token position(s) (id {self.image_token_id}) but no images; "
                             "that id marks where an image goes (a literal \"<image>\" in the text is one)")
        if slots != needed:
            raise ValueError(f"the prompt holds {slots} image-token positions but its {len(images)} image(s) fill {needed}; "
                             "build it with nanoseek.image.chat_prompt")


def check_lengths(max_seq_len: int | None, max_cached_tokens: int | None) -> None:
    """ValueError for a context or cache budget below 2 (a prompt token and a new one). None means
    the default; 0 is refused rather than read as unset, as `max_seq_len or default` would read it."""
    for name, value in (("max_seq_len", max_seq_len), ("max_cached_tokens", max_cached_tokens)):
        if value is not None and value < 2:
            raise ValueError(f"{name} must be at least 2 (a prompt token and a new one), got {value}")


@dataclass
class Event:
    """What one engine step produced for one request."""

    request_id: int
    tokens: list[int]  # new token ids (one per step, up to draft_tokens + 1 when speculating)
    finished: bool
    finish_reason: str | None = None


@dataclass(eq=False, kw_only=True)
class RequestOutcome:
    """What every request handle holds of its outcome, and answers from it and its `prompt` (which
    each subclass declares among its positional fields): the engine's Request, and the server's
    view of a request running in the engine process. Keyword-only, so subclasses keep their own
    positional fields first."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


@dataclass(eq=False)
class Request(RequestOutcome):
    """A submitted request; the handle the caller keeps. Read its fields, iterate it to stream."""

    id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    stop: Callable[[list[int]], bool] | None = None
    on_event: Callable[[Event], None] | None = None
    images: list | None = None  # preprocessed images (vision.ImageInput) whose runs the prompt holds
    _engine: "Engine | None" = None
    _events: queue.Queue = field(default_factory=queue.Queue)
    # engine-thread state: tokens in the cache, and the sampled token not yet run through the model
    _n: int = 0
    _pending: int = 0

    def cancel(self) -> None:
        if self._engine is not None:
            self._engine.cancel(self)

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until finished; the new tokens. Raises RuntimeError if the request failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.finish_reason == "error":
            raise RuntimeError(f"request {self.id} failed: {self.error}")
        return self.tokens

    def poll(self) -> list[Event]:
        """The events delivered since the last read, without blocking."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def __iter__(self):
        """Blocking stream of each step's new tokens, until the request finishes."""
        while True:
            event = self._events.get()
            if event.tokens:
                yield event.tokens
            if event.finished:
                return


class Engine:
    def __init__(self, model: DeepSeekModel, *, max_batch_size: int = 8, max_cached_tokens: int | None = None,
                 max_seq_len: int | None = None, speculative: int = 0, compile: bool | str = False,
                 cache_dtype: torch.dtype | None = None):
        """
        max_seq_len: longest prompt + max_new_tokens one request may have (default: the model's
        max_position_embeddings); each of the max_batch_size cache slots holds that many tokens.
        max_cached_tokens: bound on the tokens all running requests may occupy together (default:
        every slot full). speculative: number of MTP draft tokens per step (0: plain decoding).
        compile: compile the decode step: True or "aot" ahead of time (torch.export + AOTInductor, the
        fastest per step, one build per batch size rounded up to a power of two and per sampling mode), "dynamo" with torch.compile
        (dynamic shapes, fewer builds); a failed build falls back, with a warning, to torch.compile
        and then to eager. On a CUDA GPU any of them is torch.compile with CUDA graphs.
        """
        config = model.config
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if speculative < 0:
            raise ValueError(f"speculative (draft tokens per step) must be >= 0, got {speculative}")
        if compile not in (False, True, "aot", "dynamo"):
            raise ValueError(f"compile must be False, True, 'aot' or 'dynamo', got {compile!r}")
        if speculative and not config.num_nextn_predict_layers:
            raise ValueError("speculative decoding drafts with MTP modules, and this model has none "
                             "(num_nextn_predict_layers = 0)")
        self.model = model.eval()
        self.config = config
        self.max_batch_size = max_batch_size
        self.draft_tokens = speculative
        check_lengths(max_seq_len, max_cached_tokens)
        self.max_seq_len = max_seq_len if max_seq_len is not None else config.max_position_embeddings
        if self.max_seq_len > config.max_position_embeddings:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        self.max_cached_tokens = (max_cached_tokens if max_cached_tokens is not None
                                  else max_batch_size * (self.max_seq_len + speculative))
        self.limits = RequestLimits(config.vocab_size, self.max_seq_len, self.max_cached_tokens, speculative,
                                    tuple(config.eos_token_ids), config.image_token_id,
                                    model.vision.vcfg if model.vision is not None else None)
        self.compile = compile
        device, dtype = model.device, cache_dtype or model.dtype
        # How far past a row's cached length n a step writes: the verify fills n..n+k, and the
        # recursive drafts after `a` accepted tokens fill up to n+a+k-1, so n+2k-1 when all are.
        self.reach = max(speculative, 2 * speculative - 1)
        # one spare position: a step never attends to the whole cache, so the compiled step always
        # sees a strict slice of it and one graph serves every length
        self.cache = LatentCache(config, max_batch_size, self.max_seq_len + self.reach + 1, dtype, device)
        self.seen = torch.zeros(max_batch_size, config.vocab_size, dtype=torch.bool, device=device)
        if speculative:
            self.drafts = torch.zeros(max_batch_size, speculative, dtype=torch.long, device=device)
            self.q = torch.zeros(max_batch_size, speculative, config.vocab_size, device=device)
            # the draft count is fixed per engine: compiled with it known, a batch-1 verify of k + 1
            # tokens gets the small-matmul kernels of decode.COMPILE_OPTIONS
            torch._dynamo.mark_static(self.drafts, 1)
            torch._dynamo.mark_static(self.q, 1)
        self.running: list[Request] = []
        self._waiting: list[Request] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sampling: SamplingBatch | None = None  # of the running rows; rebuilt when they change
        # row_steps: rows x decode steps (each is one main-model forward for that sequence)
        self.counters = dict(steps=0, prefills=0, row_steps=0, generated_tokens=0, prompt_tokens=0,
                             drafted_tokens=0, accepted_tokens=0, first_accepted=0, finished=0, cancelled=0,
                             busy_seconds=0.0, prefill_seconds=0.0)

    # ---- any thread --------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams | None = None, *, max_new_tokens: int = 256,
               stop_token_ids=None, stop: Callable[[list[int]], bool] | None = None,
               on_event: Callable[[Event], None] | None = None, images: list | None = None) -> Request:
        """Queue a request; returns its handle at once. stop_token_ids None: the model's eos ids.

        images: the prompt's preprocessed images in order (`nanoseek.image.chat_prompt` gives the
        prompt ids with each image's run of image_token_id, and the images)."""
        if params is not None and not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = (params or SamplingParams()).with_seed()
        # each step builds these tensors for the whole batch: a request whose own cannot be built
        # must be refused here, not fail every request it would have joined
        try:
            SamplingBatch.from_params([params])
        except (OverflowError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"sampling parameters {params} do not fit the engine's tensors: {e}") from None
        if stop is not None and not callable(stop):  # else it would fail its request at the first token
            raise ValueError(f"stop must be a callable on the tokens so far, got {type(stop).__name__} "
                             "(for stop strings use nanoseek.inference.text.StopStrings)")
        prompt = list(prompt)
        images = list(images or [])
        stop_ids = self.limits.check(prompt, max_new_tokens, stop_token_ids, images)
        with self._lock:
            request = Request(next(self._ids), prompt, params, max_new_tokens, frozenset(stop_ids), stop, on_event,
                              images, _engine=self)
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def cancel(self, request: Request | int) -> None:
        """Ask to end a request; it finishes with reason "cancelled" at the next step boundary."""
        with self._lock:
            self._cancelled.add(request if isinstance(request, int) else request.id)
            self._wakeup.notify()

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self._waiting)
        running = list(self.running)
        c = dict(self.counters)
        return dict(
            waiting=waiting, running=len(running), max_batch_size=self.max_batch_size,
            cached_tokens=sum(len(r.prompt) + len(r.tokens) for r in running),
            reserved_tokens=sum(self._reserve(r) for r in running), max_cached_tokens=self.max_cached_tokens,
            acceptance_rate=c["accepted_tokens"] / c["drafted_tokens"] if c["drafted_tokens"] else None,
            first_draft_acceptance=c["first_accepted"] / c["row_steps"] if c["drafted_tokens"] else None,
            tokens_per_forward=(c["row_steps"] + c["accepted_tokens"]) / c["row_steps"] if c["row_steps"] else None,
            **c,
        )

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self.running)

    # ---- the engine thread -------------------------------------------------------------------------
    def start(self) -> None:
        """Step in a background daemon thread while there is work (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            if not self._stopping:
                return
            self._thread.join()  # a stop() that timed out: that thread ends after its step, never two at once
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        # from the engine's own thread (an on_event callback): it ends after this step; it cannot join itself
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if not self._thread.is_alive():  # else start() must still wait for it
                self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self.running or self._cancelled):
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # step() already failed the requests in flight; keep serving
                traceback.print_exc()

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def step(self) -> None:
        """Retire cancelled requests, admit and prefill waiting ones, then one decode step for all."""
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                self._retire_cancelled()
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                    self.counters["prefill_seconds"] += time.perf_counter() - started
                if self.running:
                    self._decode()
            self.counters["busy_seconds"] += time.perf_counter() - started
        except Exception:  # fail the requests in flight, keep the engine usable for new ones
            error = traceback.format_exc()
            for request in list(self.running):
                request.error = error
                self._finish(request, "error")
            self._retire()
            raise

    def _reserve(self, request: Request) -> int:
        return len(request.prompt) + request.max_new_tokens + self.draft_tokens

    def _retire_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.id in cancelled]
            for request in waiting:
                self._waiting.remove(request)
        # finished outside the lock: on_event may call submit, cancel or stats, which take it
        for request in waiting + [r for r in self.running if r.id in cancelled]:
            self._finish(request, "cancelled")
        self._retire()

    def _admit(self) -> list[Request]:
        admitted = []
        reserved = sum(self._reserve(r) for r in self.running)
        with self._lock:
            while self._waiting and len(self.running) + len(admitted) < self.max_batch_size:
                need = self._reserve(self._waiting[0])
                if reserved + need > self.max_cached_tokens:
                    break
                reserved += need
                admitted.append(self._waiting.pop(0))
        return admitted

    def _prefill(self, admitted: list[Request]) -> None:
        B0, B = len(self.running), len(admitted)
        self.running.extend(admitted)  # from here on a failure fails them too
        T = max(len(r.prompt) for r in admitted)
        cache = CacheView(self.cache.kv, B0, T + self.draft_tokens)  # recursive drafts run past the prompt
        s = SamplingBatch.from_params([r.params for r in admitted], self.seen.device)
        first, drafts, q = prefill(self.model, cache, self.seen[B0 : B0 + B], [r.prompt for r in admitted], s,
                                   self.draft_tokens, [r.images for r in admitted])
        if self.draft_tokens:
            self.drafts[B0 : B0 + B] = drafts
            if q is not None:  # None when every new row is greedy: their q is implied by the draft
                self.q[B0 : B0 + B] = q
        self.counters["prefills"] += 1
        now = time.perf_counter()
        for request, token in zip(admitted, first.tolist()):
            request._n, request.first_token_at = len(request.prompt), now
            self.counters["prompt_tokens"] += len(request.prompt)
            self._emit(request, [token])
        self._sampling = None
        self._retire()

    def _decode(self) -> None:
        B, k = len(self.running), self.draft_tokens
        longest = max(r._n for r in self.running) + 1 + self.reach
        attend = min(self.cache.max_len - 1, -(-longest // ATTEND_BLOCK) * ATTEND_BLOCK)
        if self._sampling is None:
            self._sampling = SamplingBatch.from_params([r.params for r in self.running], self.seen.device)
        device = self.seen.device
        pending = torch.tensor([r._pending for r in self.running], device=device)
        n = torch.tensor([r._n for r in self.running], device=device)
        self.counters["steps"] += 1
        self.counters["row_steps"] += B
        if not k:
            tokens = run_step(decode_step, self.model, self.cache.kv, self.seen, pending, n, self._sampling, attend,
                              compile=self.compile)
            for request, token in zip(list(self.running), tokens.tolist()):
                request._n += 1
                self._emit(request, [token])
        else:
            n_accepted, tokens = run_step(speculative_step, self.model, self.cache.kv, self.seen, self.drafts, self.q,
                                          pending, n, self._sampling, attend, compile=self.compile)
            out = torch.cat((n_accepted.unsqueeze(1), tokens), dim=1).tolist()
            for request, (a, *row) in zip(list(self.running), out):
                request._n += a + 1
                self.counters["drafted_tokens"] += k
                self.counters["accepted_tokens"] += a
                self.counters["first_accepted"] += a > 0
                self._emit(request, row[: a + 1])
        self._retire()

    def _emit(self, request: Request, new_tokens: list[int]) -> None:
        """Append tokens up to a stop condition; deliver them; mark the request finished if it is."""
        appended, reason = [], None
        for token in new_tokens:
            if token in request.stop_token_ids:
                reason = "stop"
                break
            request.tokens.append(token)
            appended.append(token)
            try:
                stopped = request.stop is not None and request.stop(request.tokens)
            except Exception:  # a broken stop callable fails its own request, not the whole batch
                request.error, reason = traceback.format_exc(), "error"
                break
            if stopped:
                reason = "stop"
                break
            if len(request.tokens) >= request.max_new_tokens:
                reason = "length"
                break
        request._pending = new_tokens[-1]
        self.counters["generated_tokens"] += len(appended)
        if reason:
            self._finish(request, reason, appended)
        else:
            self._deliver(request, Event(request.id, appended, False))

    def _finish(self, request: Request, reason: str, tokens: list[int] | None = None) -> None:
        if request.finished:
            return
        request.finish_reason, request.finished_at = reason, time.perf_counter()
        self.counters["finished"] += 1
        self.counters["cancelled"] += reason == "cancelled"
        request._done.set()
        self._deliver(request, Event(request.id, tokens or [], True, reason))

    def _deliver(self, request: Request, event: Event) -> None:
        request._events.put(event)
        if request.on_event is not None:
            try:
                request.on_event(event)
            except Exception:  # a broken callback must not take the other requests down
                traceback.print_exc()

    def _retire(self) -> None:
        """Drop finished requests from the running batch, moving the last row into each freed slot."""
        i = 0
        while i < len(self.running):
            if not self.running[i].finished:
                i += 1
                continue
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move_slot(last, i, moved._n + 1 + self.draft_tokens)
                self.seen[i] = self.seen[last]
                if self.draft_tokens:
                    self.drafts[i], self.q[i] = self.drafts[last], self.q[last]
                self.running[i] = moved
            self.running.pop()
            self._sampling = None
