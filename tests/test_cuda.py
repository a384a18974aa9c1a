"""nanoseek on a CUDA GPU: parity with transformers and with the CPU, the engine, compiled decode,
training and its checkpoints, the CLI's --device. Skipped on machines without one (CI has none),
except the test that --device cuda there is a clear error."""

import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from compile_checks import no_compile_fallback
from torch._dynamo.utils import counters
from hf_reference import YARN, make_hf_model
from nanoseek.inference import Engine, SamplingParams
from nanoseek.runtime import DeviceError, pick_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 1, 250], [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits: parity is checked at full precision."""
    if CUDA:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")
    done = subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--device", "cuda", "--corpus",
                           str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_bad_device_names_are_refused():
    for name in ("gpu", "mps"):
        with pytest.raises(DeviceError):
            pick_device(name)


@needs_cuda
@pytest.mark.parametrize("kind,overrides", [("v3", {"rope_scaling": YARN}), ("v2", {"topk_method": "greedy"})])
def test_logits_match_transformers_on_the_gpu(kind, overrides, tmp_path):
    hf = make_hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path)
    hf = hf.cuda()
    model = nanoseek.load(tmp_path, device="cuda")
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


@needs_cuda
def test_gpu_generation_equals_cpu_generation():
    cpu = nanoseek.build_model(nanoseek.get_preset("test"), seed=2).eval()
    gpu = nanoseek.build_model(nanoseek.get_preset("test"), seed=2).eval().cuda()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert (gpu(ids.cuda()).cpu() - cpu(ids)).abs().max().item() < 1e-4
    expected = nanoseek.generate(cpu, PROMPTS, max_new_tokens=12)
    assert nanoseek.generate(gpu, PROMPTS, max_new_tokens=12) == expected
    assert nanoseek.generate(gpu, PROMPTS, max_new_tokens=12, speculative=2) == expected


@needs_cuda
def test_gpu_engine_joins_mid_flight_and_compiled_steps_agree():
    model = nanoseek.build_model(nanoseek.get_preset("test"), seed=2).eval().cuda()
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7), SamplingParams()]

    def alone(prompt, p):
        engine = Engine(model, max_batch_size=1, max_seq_len=128)
        request = engine.submit(prompt, p, max_new_tokens=10, stop_token_ids=[])
        engine.run_until_done()
        return request.result()

    expected = [alone(prompt, p) for prompt, p in zip(PROMPTS, params)]
    engine = Engine(model, max_batch_size=2, max_seq_len=128)
    first = engine.submit(PROMPTS[0], params[0], max_new_tokens=10, stop_token_ids=[])
    engine.step()
    rest = [engine.submit(prompt, p, max_new_tokens=10, stop_token_ids=[]) for prompt, p in zip(PROMPTS[1:], params[1:])]
    engine.run_until_done()
    assert [r.result() for r in [first, *rest]] == expected
    counters["inductor"].clear()
    with no_compile_fallback():  # compile=True is torch.compile with CUDA graphs on a GPU (never the CPU-only AOT)
        assert nanoseek.generate(model, PROMPTS, max_new_tokens=10, compile=True) == nanoseek.generate(
            model, PROMPTS, max_new_tokens=10)
        sampled = dict(temperature=0.8, top_p=0.9, seed=5, repetition_penalty=1.2)
        assert nanoseek.generate(model, PROMPTS, max_new_tokens=10, compile=True, **sampled) == nanoseek.generate(
            model, PROMPTS, max_new_tokens=10, **sampled)
        assert nanoseek.generate(model, PROMPTS, max_new_tokens=10, compile=True, speculative=2) == nanoseek.generate(
            model, PROMPTS, max_new_tokens=10)
    # inductor gives up on CUDA graphs silently (a log line, then plain launches): that must not happen
    assert counters["inductor"]["cudagraph_skips"] == 0
    with no_compile_fallback():  # "aot" (CPU-only ahead-of-time steps) is CUDA graphs too on a GPU
        assert nanoseek.generate(model, PROMPTS[:1], max_new_tokens=4, compile="aot") == nanoseek.generate(
            model, PROMPTS[:1], max_new_tokens=4)


@needs_cuda
def test_training_on_the_gpu_lowers_the_loss_and_resumes_on_the_cpu(tmp_path):
    text = "".join(f"def square_{i}(x):\n    return x * x + {i}\n\n" for i in range(400))
    (tmp_path / "code.txt").write_text(text)
    run = tmp_path / "run"
    base = [sys.executable, "-m", "nanoseek.cli", "train", "--corpus", str(tmp_path / "code.txt"), "--out", str(run),
            "--preset", "test", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "64", "--warmup-steps", "5",
            "--eval-every", "10", "--eval-batches", "2", "--log-every", "1", "--max-new-tokens", "8"]
    done = subprocess.run(base + ["--device", "cuda", "--steps", "30", "--save-every", "15", "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cuda" in done.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # the step-15 checkpoint continues on the CPU: a checkpoint is not tied to the device that wrote it
    done = subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--resume", str(run / "step-000015"),
                           "--device", "cpu", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == 30
    # the same steps on two devices: close, not bitwise (different kernels)
    gpu_loss = {r["step"]: r["loss"] for r in rows}
    assert all(abs(r["loss"] - gpu_loss[r["step"]]) < 0.05 for r in resumed if r["step"] > 15)
    done = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", str(run / "latest"), "--device", "cuda",
                           "--prompt", "def square_1", "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
