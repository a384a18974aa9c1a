"""The engine in a process of its own, behind the same surface as the in-process TextGenerator.

Why: a compiled decode step is one long call into C++ that holds Python's GIL (AOTInductor does not
release it), so in one process the HTTP event loop's work (parsing, tokenizing, writing server-sent
events) and the engine's steps take turns instead of running on separate cores. Measured before
this split: the server made 81-87% of the engine's own tokens/s. vLLM splits its server the same
way. The child process loads the model and runs the engine; the server process keeps the
tokenizer for prompts and chat templates, checks each request against the engine's limits before
it crosses (a bad one gets its 400 at once), and receives messages with every running request's
new tokens (one per `send_interval`, and at once for a first token or an end), which it turns into
text (as vLLM's front end does): detokenizing in the child took time from every step, and moving
it to the server's process took the served decode step on `tiny` at 8 clients from 1.84 to 1.69
ms and tokens/s up 10% (six interleaved pairs). A request with stop strings is the exception: the
child decodes its text too, so that it ends in the very step where a stop string appears, as
in-process.

    generator = EngineProcess.start("runs/sft/latest", max_batch_size=8, compile=True)
    g = generator.submit(prompt_ids, SamplingParams(), max_tokens=64, on_text=callback)
    # callback(delta, event) runs on the server's reader thread after each of the request's steps
    generator.engine.stats(); generator.engine.cancel(g.request); generator.engine.stop()

The child is started with "spawn": forking a process that has started OpenMP or CUDA threads is
not safe.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..inference.engine import Event, RequestLimits, RequestOutcome
from ..inference.sampling import SamplingParams
from ..inference.text import TextDecoder
from ..tokenizer import Tokenizer
from .textgen import Generation


class EngineStopped(RuntimeError):
    """The engine process is gone (it crashed or was killed); no request can be served."""


@dataclass(eq=False)
class RemoteRequest(RequestOutcome):
    """The server process's view of a request running in the engine process (the fields the server
    and its metrics read of an engine Request; times are taken in this process, IPC included)."""

    id: int
    prompt: list[int]
    on_text: Callable | None = None
    text: TextDecoder | None = None  # set when this process makes the text (no stop strings)


class RemoteEngine:
    """start/stop/submit/cancel/stats of the engine in the child, as the server calls them."""

    def __init__(self, process, conn, info: dict, tokenizer: Tokenizer):
        self._process, self._conn, self._tokenizer = process, conn, tokenizer
        self.config: ModelConfig = info["config"]
        self.limits: RequestLimits = info["limits"]
        self.max_batch_size: int = info["max_batch_size"]
        self._stats: dict = info["stats"]
        self._requests: dict[int, RemoteRequest] = {}
        self._next_id = 0
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # _requests and _stats, shared with the reader thread
        self._reader: threading.Thread | None = None
        self._dead: str | None = None

    # ---- the server's side ---------------------------------------------------------------------
    def start(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="nanoseek-engine-reader", daemon=True)
            self._reader.start()

    def stop(self, timeout: float | None = None) -> None:
        try:
            self._send(("stop",))
        except (OSError, RuntimeError):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None

    def submit(self, prompt: list[int], params: SamplingParams, *, max_new_tokens: int, stop_strings: list[str],
               ignore_eos: bool, on_text: Callable | None, images: list | None) -> RemoteRequest:
        prompt, images = list(prompt), list(images or [])
        self.limits.check(prompt, max_new_tokens, None, images)  # raises ValueError like Engine.submit
        # images cross as numpy arrays: pickled torch tensors would travel through shared-memory
        # file descriptors, a second channel with its own failure modes
        plain_images = [(im.views.numpy(), im.tiles) for im in images]
        with self._lock:  # the reader fails all requests under this lock: a new one is either failed or refused
            if not self.alive:
                raise EngineStopped(f"the engine process has stopped: {self._dead or 'exited'}")
            rid, self._next_id = self._next_id, self._next_id + 1
            request = self._requests[rid] = RemoteRequest(rid, prompt, on_text)
        if not any(stop_strings):
            request.text = TextDecoder(self._tokenizer)
        try:
            self._send(("submit", rid, prompt, params, max_new_tokens, list(stop_strings), ignore_eos, plain_images))
        except (OSError, EOFError) as e:  # the child died after the check (a broken pipe): 503, not a 500
            with self._lock:
                ours = self._requests.pop(rid, None) is not None
            if not ours:  # the reader failed it already and told its callback: the caller sees that
                return request
            raise EngineStopped(f"the engine process has stopped: {self._dead or e}") from None
        return request

    def cancel(self, request: RemoteRequest | int) -> None:
        rid = request if isinstance(request, int) else request.id
        try:
            self._send(("cancel", rid))
        except (OSError, RuntimeError):  # the child is gone: its requests were failed already
            pass

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    @property
    def alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    @property
    def pid(self) -> int:
        return self._process.pid

    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._stats)
            # requests sent but not yet seen by the child count as waiting, so queue limits hold at once
            outstanding = len(self._requests)
        stats["waiting"] = max(stats["waiting"], outstanding - stats["running"])
        return stats

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    # ---- the reader thread ---------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._fail_all("the engine process exited")
                return
            if message[0] == "stopped":
                self._fail_all("the engine was stopped")  # nothing should be left; nothing may hang
                return
            if message[0] == "crashed":
                print(message[1], flush=True)
                self._fail_all(message[1].strip().splitlines()[-1])
                return
            _, updates, stats = message
            now = time.perf_counter()
            with self._lock:
                self._stats = stats
            for rid, delta, tokens, finished, reason, error in updates:
                with self._lock:
                    request = self._requests.get(rid)
                    if request is not None and finished:
                        del self._requests[rid]
                if request is None:
                    continue
                if tokens and request.first_token_at is None:
                    request.first_token_at = now
                request.tokens.extend(tokens)
                if request.text is not None:
                    request.text(request.tokens)
                    delta = request.text.take(final=finished)
                if finished:
                    request.finish_reason, request.error, request.finished_at = reason, error, now
                    request._done.set()
                _call_back(request, delta, Event(rid, tokens, finished, reason))

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._dead = why
            failed, self._requests = list(self._requests.values()), {}
            # the gauges the child last sent would stay frozen in /metrics: nothing runs or waits now
            self._stats = {**self._stats, "running": 0, "waiting": 0, "cached_tokens": 0}
        for request in failed:
            request.finish_reason, request.error, request.finished_at = "error", why, time.perf_counter()
            request._done.set()
            _call_back(request, "", Event(request.id, [], True, "error"))


def _call_back(request: RemoteRequest, delta: str, event: Event) -> None:
    """The request's on_text, if any. One that raises is reported and passed over, as the engine does
    with its callbacks: on the reader thread, the exception would end the thread and leave every
    request waiting for events that never come."""
    if request.on_text is not None:
        try:
            request.on_text(delta, event)
        except Exception:
            traceback.print_exc()


class EngineProcess:
    """A TextGenerator whose engine runs in a child process (see the module docstring)."""

    def __init__(self, engine: RemoteEngine, tokenizer: Tokenizer):
        self.engine, self.tokenizer = engine, tokenizer  # stop tokens and strings are applied in the child

    @classmethod
    def start(cls, path, *, ready_timeout: float | None = None, send_interval: float = 0.0,
              **load_kwargs) -> "EngineProcess":
        """Start the child, which loads `path` with textgen.load_generator(**load_kwargs) and warms
        up (compiling, when asked); returns once it is ready. Load errors come back as ValueError.

        send_interval: least seconds between two messages from the child, each carrying every token
        since the last (a first token and an end go at once). Each message is a pipe write, ~50 us
        of the engine's core, that wakes this process; `nanoseek serve` passes its --stream-interval
        (see server.py for what it gained)."""
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(target=_child_main, args=(child_conn, str(path), load_kwargs, send_interval),
                                  name="nanoseek-engine", daemon=True)
        process.start()
        child_conn.close()
        tokenizer = Tokenizer.load(path)
        if not parent_conn.poll(ready_timeout):
            process.terminate()
            raise TimeoutError(f"the engine process was not ready after {ready_timeout} s")
        try:
            message = parent_conn.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(f"the engine process died while loading {path} (exit code {process.exitcode})") from None
        if message[0] == "failed":
            process.join(5)
            raise ValueError(message[1])
        return cls(RemoteEngine(process, parent_conn, message[1], tokenizer), tokenizer)

    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    @property
    def accepts_images(self) -> bool:
        return self.engine.limits.vision is not None

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int, stop: list[str] = (),
               ignore_eos: bool = False, on_text: Callable | None = None, images: list | None = None) -> Generation:
        request = self.engine.submit(prompt_ids, params, max_new_tokens=max_tokens, stop_strings=list(stop),
                                     ignore_eos=ignore_eos, on_text=on_text, images=images)
        return Generation(request, None)


# ---- the child process -------------------------------------------------------------------------------
def _child_main(conn, path: str, load_kwargs: dict, send_interval: float) -> None:
    """Load, then alternate: take every command waiting (block when there is no work), one engine
    step; then, when a request got its first token or ended, or send_interval seconds have passed
    since the last one, one message with what the steps made for every request and the engine's stats."""
    import torch

    from ..model.vision import ImageInput
    from ..runtime import tune_allocator
    from .textgen import load_generator

    tune_allocator()  # a spawned process starts afresh: the CLI's process-wide settings are not inherited
    try:
        generator = load_generator(path, **load_kwargs)
    except Exception as e:  # any load failure: the parent reports it and exits
        conn.send(("failed", f"{e}"))
        return
    engine = generator.engine
    conn.send(("ready", {"config": engine.config, "limits": engine.limits, "max_batch_size": engine.max_batch_size,
                         "stats": engine.stats()}))
    generations: dict[int, Generation] = {}
    outbox: dict[int, tuple] = {}  # request id -> (id, text, tokens, finished, reason, error) since the last message
    urgent = False  # the outbox holds a first token or an end: send it after this step, whatever the interval
    last_sent = 0.0

    def on_text_for(rid: int):
        def on_text(delta: str, event: Event) -> None:
            nonlocal urgent
            request = generations[rid].request
            error = request.error if event.finished else None
            _, text, tokens, _, _, _ = outbox.get(rid, (rid, "", [], False, None, None))
            outbox[rid] = (rid, text + delta, tokens + event.tokens, event.finished, event.finish_reason, error)
            urgent |= event.finished or len(request.tokens) == len(event.tokens) > 0
            if event.finished:
                del generations[rid]
        return on_text

    try:
        while True:
            if not engine.has_work or conn.poll(0):
                message = conn.recv()  # blocks only when idle
                while True:
                    kind = message[0]
                    if kind == "stop":
                        conn.send(("stopped",))
                        return
                    if kind == "submit":
                        _, rid, prompt, params, max_tokens, stop, ignore_eos, images = message
                        try:
                            generations[rid] = generator.submit(
                                prompt, params, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos,
                                on_text=on_text_for(rid), detokenize=False, images=[ImageInput(torch.from_numpy(np.asarray(v)), tuple(t))
                                                                  for v, t in images])
                        except ValueError as e:  # checked in the parent already; kept as a safety net
                            outbox[rid] = (rid, "", [], True, "error", str(e))
                            urgent = True
                    elif kind == "cancel":
                        if message[1] in generations:
                            engine.cancel(generations[message[1]].request)
                    if not conn.poll(0):
                        break
                    message = conn.recv()
            if engine.has_work:
                try:
                    engine.step()
                except Exception:  # step() has failed the requests in flight (reported below); keep serving
                    traceback.print_exc()
            now = time.perf_counter()
            if outbox and (urgent or now - last_sent >= send_interval or not engine.has_work):
                conn.send(("events", list(outbox.values()), engine.stats()))
                outbox, urgent, last_sent = {}, False, now
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the server went away
        return
    except Exception:
        try:
            conn.send(("crashed", traceback.format_exc()))
        except OSError:
            pass
