"""The two kinds of engine step, as plain functions of tensors so torch.compile can take them whole.

- `prefill`: fresh sequences (padded on the right) through the plain form of MLA, filling the
  cache, then the first token of each (and, when speculating, the first drafts).
- `decode_step`: one new token per row through the absorbed form, sampling included, so a step
  is one compiled graph whose only output the host reads is the (B,) sampled ids.

`run_step` runs a step compiled ahead of time (aot.py: torch.export + AOTInductor, no Dynamo per
call), falling back to torch.compile (dynamic shapes: batch size and attended length change without
recompiling) and then to eager, each with a warning. Both compiled paths use the inductor settings
of COMPILE_OPTIONS. On a CUDA GPU a compiled step is torch.compile with CUDA graphs (one launch
replays the whole step), falling back to torch.compile without them, then to eager.
"""

import os
import warnings
import weakref

import torch

from ..model.transformer import DeepSeekModel
from .forward import CacheView, model_forward
from .sampling import TARGET, SamplingBatch, sample
from .aot import aot_call
from .speculative import _rows, draft, mark_seen


def decode_step(model: DeepSeekModel, kv, seen, ids_B, pos_B, s: SamplingBatch, attend: int):
    """Tokens ids_B at positions pos_B -> the next token of each row (B,).

    kv and seen are the engine's whole buffers (layers, slots, max_len, R) and (slots, V): the step
    uses the first B slots and attends to `attend` positions, slicing inside the graph so the
    compiled step always sees tensors of the same strides. seen (the tokens of each sequence, for
    the repetition penalty) gets the new tokens while some row uses a penalty.
    """
    B = ids_B.shape[0]
    hidden = model_forward(model, CacheView(kv, 0, attend), ids_B.unsqueeze(1), pos_B.unsqueeze(1))
    penalty_seen = seen[:B].unsqueeze(1) if s.any_penalty else None
    next_B = sample(model.lm_head(hidden), s, penalty_seen, pos_B.unsqueeze(1) + 1, TARGET).squeeze(1)
    if s.any_penalty:  # only rows with a penalty read seen, and such a row makes any_penalty true
        seen[torch.arange(B, device=ids_B.device), next_B] = True
    return next_B


@torch.inference_mode()
def prefill(model: DeepSeekModel, cache: CacheView, seen_BV, prompts: list[list[int]], s: SamplingBatch,
            draft_tokens: int = 0, images: list[list] | None = None):
    """Run fresh prompts (lengths may differ) into the cache view's slots and sample each one's first token.

    images: for each prompt, its preprocessed images (`vision.ImageInput`) in order, each already
    expanded in the prompt to its run of image_token_id; they are merged into the embeddings.

    seen_BV rows are reset to the prompt's tokens plus the sampled one. Returns the first tokens (B,)
    and, with draft_tokens > 0, the MTP drafts (B, k) and their distributions (B, k, V).
    """
    B, T = len(prompts), max(len(p) for p in prompts)
    device = cache.kv.device
    ids_BT = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        ids_BT[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths_B = torch.tensor([len(p) for p in prompts], device=device)
    pos_BT = torch.arange(T, device=device).expand(B, T)
    embeds_BTD = None
    if images and any(images):
        embeds_BTD = model.embed_multimodal(ids_BT, [image for row in images for image in row or ()])
    hidden_BTD = model_forward(model, cache, ids_BT, pos_BT, plain=True, embeds_BTD=embeds_BTD)
    last_B = lengths_B - 1
    seen_BV.zero_()
    valid_BT = pos_BT < lengths_B.unsqueeze(1)
    seen_BV.copy_(mark_seen(seen_BV, ids_BT, valid_BT))
    logits_B1V = model.lm_head(_rows(hidden_BTD, last_B)).unsqueeze(1)
    seen = seen_BV.unsqueeze(1) if s.any_penalty else None
    first_B = sample(logits_B1V, s, seen, lengths_B.unsqueeze(1), TARGET).squeeze(1)
    seen_BV[torch.arange(B, device=device), first_B] = True
    if not draft_tokens:
        return first_B, None, None
    # MTP row i reads token i+1: the prompt shifted by one, with the first sampled token at the end
    next_BT = torch.cat((ids_BT[:, 1:], ids_BT[:, :1]), dim=1).scatter(1, last_B.unsqueeze(1), first_B.unsqueeze(1))
    drafts, q = draft(model, cache, hidden_BTD, next_BT, torch.zeros_like(last_B), last_B, s, seen_BV, draft_tokens)
    return first_B, drafts, q


_COMPILED: dict = {}
_WARM: set = set()  # (step, input signature) pairs that already ran once with all of Dynamo's guards

# How decode steps are compiled. cpp_wrapper: the compiled graph launches its kernels from C++, not
# Python. decompose_mm_pass: a matmul with a single row (batch-1 decode) becomes a pointwise-multiply
# and sum that inductor fuses with its neighbours, instead of a oneDNN call per weight; together
# they halve the batch-1 step on the `tiny` config (benchmarks/decode.py).
WIDEST_DECOMPOSED = 1 << 18
MOST_ROWS_DECOMPOSED = 4  # torch.compile path: a speculative verify of up to 3 drafts at batch 1
# Ahead-of-time steps are compiled for a fixed batch (aot.py pads to a power of two), so every
# matmul's row count is known: up to this many rows they are decomposed too. At 8, 16 and 32 rows
# this made batched decode 1.3-2x faster on `tiny` than oneDNN matmuls over a symbolic batch
# (benchmarks/decode.py); the limit is set per artifact to its own row count, since a higher
# limit than the step's rows slowed it down.
AOT_MOST_ROWS_DECOMPOSED = 32
# A decomposed matmul reads its weight once per row, so its cost grows with the rows, while a
# oneDNN call costs nearly the same for 1 or 16 rows; in bf16 oneDNN also has AVX512-bf16 dot
# products and the decomposed kernel converts every weight to fp32. So from 8 rows on, bf16
# matrices wider than this go to oneDNN (on `tiny`: the output head and the dense MLP). Measured,
# 1 thread: one 8-row bf16 matmul against a 256x4096 weight took 377 us decomposed and 111 us in
# oneDNN; the batch-8 bf16 decode step went from 2.46 to 2.13 ms, batch 16 from 4.26 to 3.33 ms
# (the same two models compiled both ways, in one process). In fp32 oneDNN has no such edge:
# full decomposition stayed faster at batch 8 (2.84 against 3.14 ms), so fp32 keeps it.
BF16_WIDEST_DECOMPOSED_FROM_8_ROWS = 256


def _widest_decomposed(rows: int, dtype: torch.dtype) -> int:
    return BF16_WIDEST_DECOMPOSED_FROM_8_ROWS if dtype == torch.bfloat16 and rows >= 8 else WIDEST_DECOMPOSED


def _decomposition(rows: int, widest: int = WIDEST_DECOMPOSED) -> dict:
    return {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": widest,
                                  "cpu_max_first_dimension_decomposition": rows}}


COMPILE_OPTIONS = {
    "cpp_wrapper": True,
    # single-threaded kernels on this fallback path (extern matmuls still use torch's threads); the
    # ahead-of-time steps, the ones normally run, use torch's threads (_kernel_threads)
    "cpp.threads": 1,
    # the limits are also here so that inductor's compile cache tells settings apart
    "post_grad_fusion_options": _decomposition(MOST_ROWS_DECOMPOSED),
}
AOT_OPTIONS = {k: v for k, v in COMPILE_OPTIONS.items() if k != "cpp_wrapper"}  # AOTInductor is C++ anyway


def _decompose_wide_matmuls(rows: int = MOST_ROWS_DECOMPOSED, widest: int = WIDEST_DECOMPOSED) -> None:
    """Let decompose_mm_pass take matrices wider than its 2048 default (left to oneDNN, the output
    head, 4096 wide on `tiny`, alone costs as much as the rest of a batch-1 step) and up to `rows`
    rows instead of 1 (a speculative verify, a batch). Inductor reads the limits from module
    constants, so they are set there (and skipped if a later torch moves them). Only shapes known
    when compiling qualify."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm
    except ImportError:
        return
    if hasattr(decompose_mem_bound_mm, "cpu_max_other_dimension_decomposition"):
        decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = widest
        decompose_mem_bound_mm.cpu_max_first_dimension_decomposition = rows


# Ahead-of-time steps run their fused kernels on torch's threads. Inductor fuses a step into a few
# large kernels (at batch 8 bf16 on `tiny`: two of ~390 us, one of ~300, two of ~126), which had run
# on one thread while the other core idled outside oneDNN calls. The same step compiled both ways,
# 2 threads: batch 1, `nanoseek.generate` interleaved, 2,102 -> 3,041 tok/s fp32, 3,745 -> 4,994 bf16;
# a server at 1 client +23%; batch 8 bf16 1.51-1.67 -> 1.01-1.17 ms a step, batch 16 3.65-4.47 ->
# 2.08-2.13 ms, fp32 batch 8 2.83-2.98 -> 2.10-2.15 ms. With one torch thread nothing changes.
# Under OMP_WAIT_POLICY=PASSIVE every parallel kernel wakes a sleeping thread: a served batch-8 step
# took 4.3 ms instead of 1.1, far worse than one thread, so then kernels stay on one.
def _kernel_threads() -> int:
    return 1 if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else torch.get_num_threads()


def _aot_options(tokens_per_row: int):
    """Inductor options (set up for the compile about to run) of an artifact for a batch size and dtype."""
    def options(batch: int, dtype: torch.dtype) -> dict:
        rows = min(batch * tokens_per_row, AOT_MOST_ROWS_DECOMPOSED)
        widest = _widest_decomposed(batch * tokens_per_row, dtype)
        _decompose_wide_matmuls(rows, widest)
        return {**AOT_OPTIONS, "post_grad_fusion_options": _decomposition(rows, widest),
                "cpp.threads": _kernel_threads()}
    return options


# On a GPU a decode step of a small model is launch-bound: on an H200 the `tiny` preset's compiled
# step made 601 tokens/s at batch 1 (stop 10), its few dozen kernels each running for microseconds
# and each costing a launch from the host. CUDA graphs replay a recorded step with one launch.
# Inductor records one graph per distinct (batch, attended length), the attended length growing in
# the engine's ATTEND_BLOCK steps, so a long generation records dozens: no warning for that.
CUDA_GRAPH_OPTIONS = {"triton.cudagraphs": True}
if hasattr(torch._inductor.config.triton, "cudagraph_dynamic_shape_warn_limit"):
    CUDA_GRAPH_OPTIONS["triton.cudagraph_dynamic_shape_warn_limit"] = None


def compiled(fn, cuda_graphs: bool = False):
    """fn compiled with torch.compile (once per process), dynamic shapes, one graph per step."""
    key = (fn, cuda_graphs)
    if key not in _COMPILED:  # torch.compile builds on the first call: _dynamo_call sets the limits before it
        options = CUDA_GRAPH_OPTIONS if cuda_graphs else COMPILE_OPTIONS
        _COMPILED[key] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
    return _COMPILED[key]


def _signature(args) -> tuple:
    """Everything about a step's inputs that Dynamo's guards can depend on: shapes, dtypes, flags, ids."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device))
        elif isinstance(a, SamplingBatch):
            key.append(_signature(a))
        elif isinstance(a, torch.nn.Module):  # a weak reference: a later model reusing the id is not equal
            key.append((weakref.ref(a), getattr(a, "dtype", None)))
        else:
            key.append(a)
    return (tuple(key), torch.is_inference_mode_enabled(), torch.is_grad_enabled())


def run_step(fn, *args, compile: bool | str = True):
    """Call a step, compiled if asked: ahead of time (aot.py), else torch.compile, else eagerly.

    compile: False (eager), True or "aot" (ahead of time), "dynamo" (torch.compile only).

    args are (model, *buffers, *per_row, sampling, attend) as `decode_step` and
    `speculative_step` take them. Each compiled path that fails warns once and is not tried again.
    """
    if not compile:
        return fn(*args)
    if compile not in (True, "aot", "dynamo"):
        raise ValueError(f"compile must be False, True, 'aot' or 'dynamo', got {compile!r}")
    device = args[0].device
    if device.type == "cuda" and _FAILED.get((fn, "cuda graphs")) is None:
        try:
            return _cuda_graphs_call(fn, args)
        except Exception as e:
            _fail(fn, "cuda graphs", e, "torch.compile without CUDA graphs")
    if compile != "dynamo" and device.type != "cpu":
        # AOT steps exist to cut the CPU's per-call overhead. On CUDA (torch 2.11, H200) loading the
        # AOTInductor package crashed the process, which no fallback can catch: torch.compile there.
        if compile == "aot" and fn not in _WARNED_NOT_CPU:
            _WARNED_NOT_CPU.add(fn)  # not a _FAILED entry: AOT stays on for models on the CPU
            warnings.warn(f"compiling {fn.__name__} (aot): ahead-of-time steps run on the CPU only, "
                          f"not {device}; using torch.compile")
        compile = "dynamo"
    if compile != "dynamo" and _FAILED.get((fn, "aot")) is None:
        model, rest, s, attend = args[0], args[1:-2], args[-2], args[-1]
        n = BUFFERS[fn.__name__]
        try:
            tokens_per_row = 1 if fn is decode_step else rest[2].shape[1] + 1  # a verify: k drafts + 1 per row
            return aot_call(fn, model, rest[:n], rest[n:], s, attend, _aot_options(tokens_per_row))
        except Exception as e:
            _fail(fn, "aot", e, "torch.compile")
    if _FAILED.get((fn, "dynamo")) is None:
        try:
            return _dynamo_call(fn, args)
        except Exception as e:  # inductor needs a working C++ compiler; eager is always available
            _fail(fn, "dynamo", e, "eager")
    return fn(*args)


BUFFERS = {"decode_step": 2, "speculative_step": 4}  # leading args that are whole engine buffers
_FAILED: dict = {}
_WARNED_NOT_CPU: set = set()


def _fail(fn, path: str, error: Exception, fallback: str) -> None:
    _FAILED[(fn, path)] = error
    warnings.warn(f"compiling {fn.__name__} ({path}) failed ({type(error).__name__}: {error}); using {fallback}")


def _dynamo_call(fn, args, cuda_graphs: bool = False):
    """torch.compile path. Dynamo checks a few hundred guards (every parameter, every input's shape)
    on each call; once inputs of a signature have passed them, later calls with the same signature
    skip that check (`skip_guard_eval_unsafe`), safe because the signature pins down what they test."""
    key = (fn, cuda_graphs, _signature(args))
    if key in _WARM:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return compiled(fn, cuda_graphs)(*args)
    # a first call may compile: the limits are process-wide and an AOT build since may have changed them
    _decompose_wide_matmuls()
    out = compiled(fn, cuda_graphs)(*args)
    _WARM.add(key)
    return out


def _cuda_graphs_call(fn, args):
    """torch.compile with CUDA graphs. The step writes into the engine's buffers (the cache, seen):
    a graph may mutate only inputs whose address is fixed, so they are marked as such (a new buffer,
    another engine's, is recorded anew). A replay reuses its outputs' memory, so they are copied
    out before a later replay can overwrite tokens the engine still holds."""
    for buffer in args[1 : 1 + BUFFERS[fn.__name__]]:
        torch._dynamo.mark_static_address(buffer)
    torch.compiler.cudagraph_mark_step_begin()
    out = _dynamo_call(fn, args, cuda_graphs=True)
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
