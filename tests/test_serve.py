"""`nanoseek serve` as a subprocess on loopback, driven by the official openai package, httpx and a
headless Chromium: completions, streaming, concurrency, limits, disconnects and the chat page."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import nanoseek
from nanoseek.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"
MAX_BODY = 64 * 1024
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model and a tokenizer trained on nanoseek's own source, saved together."""
    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    source = [p.read_text() for p in sorted(Path(nanoseek.__file__).parent.rglob("*.py"))]
    tok = Tokenizer.train(source, 512)
    config = nanoseek.get_preset("test").replace(vocab_size=512, max_position_embeddings=4096)
    nanoseek.save(nanoseek.build_model(config, seed=0), folder, extra_files=tok.files())
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model_dir), "--port", str(self.port), *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"server did not come up:\n{log.read_text()}")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-batch-size", "16",
               "--max-body-bytes", str(MAX_BODY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_completion_plain_and_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    plain = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, **GREEDY)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert plain.usage.completion_tokens == 16 and plain.usage.prompt_tokens > 5
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 16
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # it streams: a longer answer arrives in several chunks (the server coalesces only what has
    # already landed when it wakes, so on a loaded machine 16 tokens may come in one chunk)
    long = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=96, stream=True, **GREEDY)
    assert len([c for c in long if c.choices and c.choices[0].delta.content]) > 1


def test_completion_text_ids_and_stop_strings(client):
    full = client.completions.create(model="tiny-chat", prompt="def forward(self, x):", max_tokens=24, **GREEDY)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    # token-id prompts work too, and the same seed gives the same sample
    sampled = [client.completions.create(model="tiny-chat", prompt=[0, 5, 9, 42], max_tokens=8, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    # a stop string cuts the output just before its first occurrence, streamed or not
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop)]
    cut = client.completions.create(model="tiny-chat", prompt="def forward(self, x):", max_tokens=24, stop=[stop],
                                    **GREEDY)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny-chat", prompt="def forward(self, x):", max_tokens=24,
                                              stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_streams_get_the_tokens_they_get_alone(server, client):
    prompts = [[0] + [(7 * i + 3 * j) % 500 + 8 for j in range(3 + i % 5)] for i in range(16)]
    alone = [client.completions.create(model="tiny-chat", prompt=p, max_tokens=20, **GREEDY) for p in prompts]
    steps_before = server.metrics()["nanoseek_engine_steps_total"]

    async def stream(aclient, prompt):
        chunks = await aclient.completions.create(model="tiny-chat", prompt=prompt, max_tokens=20, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY)
        text, usage = "", None
        async for chunk in chunks:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        async with aclient:
            return await asyncio.gather(*(stream(aclient, p) for p in prompts))

    together = asyncio.run(all_at_once())
    assert together == [(a.choices[0].text, a.usage.completion_tokens) for a in alone]
    # they shared decode steps: far fewer steps than 16 requests x 20 tokens
    assert server.metrics()["nanoseek_engine_steps_total"] - steps_before < 16 * 20 / 2


def test_bad_requests_get_errors_and_the_server_still_serves(server, client):
    url = server.url
    ok = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("malformed JSON", 400, dict(content=b'{"model": "tiny-chat", "messages": [')),
        ("not an object", 400, dict(json=["model"])),
        ("messages not a list", 400, dict(json={**ok, "messages": "hi"})),
        ("content a number", 400, dict(json={**ok, "messages": [{"role": "user", "content": 3}]})),
        ("max_tokens a string", 400, dict(json={**ok, "max_tokens": "many"})),
        ("temperature a string", 400, dict(json={**ok, "temperature": "hot"})),
        ("unknown role", 400, dict(json={**ok, "messages": [{"role": "wizard", "content": "hi"}]})),
        ("unknown model", 404, dict(json={**ok, "model": "gpt-17"})),
        ("negative max_tokens", 400, dict(json={**ok, "max_tokens": -5})),
        ("an image for a text-only model", 400, dict(json={**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})),
        ("oversize body", 413, dict(json={**ok, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]})),
        ("over-long prompt", 400, dict(json={**ok, "messages": [{"role": "user", "content": "def f(x): " * 2000}]})),
        ("prompt + max_tokens over the context", 400, dict(json={**ok, "max_tokens": 5000})),
    ]
    for name, status, kwargs in cases:
        response = httpx.post(url + "/v1/chat/completions", **kwargs)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], name
        assert client.chat.completions.create(model="tiny-chat", messages=ok["messages"], max_tokens=2).choices
    assert "context length" in httpx.post(url + "/v1/chat/completions", **cases[-1][2]).json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json={"model": "tiny-chat", "prompt": [0, 99999]}).status_code == 400
    assert httpx.get(url + "/v1/nothing").json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-chat", messages=ok["messages"], max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="hi")


def test_sampling_values_the_engine_cannot_hold_get_400_and_null_means_the_default(server, client):
    """A top_k beyond int64 used to fail every request of the running batch; an infinite penalty got
    500. OpenAI's clients send null for optional fields left unset."""
    url = server.url + "/v1/completions"
    ok = b'{"model": "tiny-chat", "prompt": "def f", "max_tokens": 3, '
    for field, value in [("top_k", b"100000000000000000000000"), ("seed", b"9223372036854775808"),
                         ("repetition_penalty", b"Infinity"), ("repetition_penalty", b"1e999"), ("top_p", b"NaN")]:
        response = httpx.post(url, content=ok + b'"' + field.encode() + b'": ' + value + b"}",
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, (field, value, response.text)
        assert response.json()["error"]["param"] == field
    nulls = dict(temperature=None, top_p=None, n=None, presence_penalty=None, frequency_penalty=None, stream=None,
                 top_k=None, min_p=None, repetition_penalty=None, ignore_eos=None, seed=None, stop=None, user=None,
                 stream_options=None, echo=None, logprobs=None, suffix=None, best_of=None)
    response = httpx.post(url, json={"model": "tiny-chat", "prompt": "def f", "max_tokens": 3, **nulls})
    assert response.status_code == 200, response.text
    chat = {k: v for k, v in nulls.items() if k not in ("echo", "suffix", "best_of")}
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": None,
        "max_tokens": 3, **chat})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_cache_smaller_than_the_context_bounds_the_context(model_dir, monkeypatch):
    """--max-cached-tokens below the model's context: a request without max_tokens gets the rest of
    what the cache may hold (it used to get 400), and /v1/models reports that as the context.
    In-process, so that the server's own mapping of a refused sampling value to 400 is seen too."""
    from fastapi.testclient import TestClient

    import nanoseek.serve.server as server_module
    from nanoseek.inference.sampling import SamplingError
    from nanoseek.serve.textgen import load_generator

    generator = load_generator(model_dir, max_batch_size=2, max_cached_tokens=64, speculative=1)
    app = server_module.create_app(generator, model_name="tiny-chat")
    with TestClient(app) as http:
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 63  # one token for the draft
        body = {"model": "tiny-chat", "prompt": [0, 5, 9], "ignore_eos": True}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["total_tokens"] == 63
        assert http.post("/v1/completions", json={**body, "max_tokens": 61}).json()["error"]["code"] == \
            "context_length_exceeded"

        def refuse(*args):
            raise SamplingError("sampling parameter top_p=0.5: refused", "top_p")

        monkeypatch.setattr(server_module, "SamplingParams", refuse)
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "top_p"


def test_terminal_chat_refuses_a_max_tokens_below_1(model_dir, capsys):
    from nanoseek.cli import main

    assert main(["chat", "--model", str(model_dir), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("nanoseek chat: --max-tokens must be at least 1")
    # sampling flags too are checked before the model loads (no such folder: its error would come first)
    assert main(["chat", "--model", str(model_dir / "missing"), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def wait_for(server, condition, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        metrics = server.metrics()
        if condition(metrics) or time.time() > deadline:
            return metrics
        time.sleep(0.05)


def test_a_client_that_drops_frees_its_slot(server):
    before = server.metrics()
    body = {"model": "tiny-chat", "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert wait_for(server, lambda m: m["nanoseek_running_requests"] == 1)["nanoseek_running_requests"] == 1
    # the connection is closed mid-stream: the server cancels the generation and frees the slot
    key = 'nanoseek_generations_total{finish_reason="cancelled"}'
    after = wait_for(server, lambda m: m["nanoseek_running_requests"] == 0 and m.get(key, 0) >= 1)
    assert after["nanoseek_running_requests"] == 0
    assert after["nanoseek_client_disconnects_total"] == before["nanoseek_client_disconnects_total"] + 1
    assert after["nanoseek_generation_tokens_total"] - before["nanoseek_generation_tokens_total"] < 4000
    # the same for a client that gives up waiting on a non-streamed answer
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(0.5, connect=10))
    after = wait_for(server, lambda m: m["nanoseek_running_requests"] == 0 and m.get(key, 0) >= 2)
    assert after["nanoseek_running_requests"] == 0 and after[key] == 2


def test_api_key_and_queue_limit(model_dir, tmp_path):
    s = Server(model_dir, tmp_path / "server.log", "--api-key", "sesame", "--max-batch-size", "1", "--max-queue", "1")
    try:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = httpx.get(s.url + "/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0, timeout=30)
        assert client.models.list().data[0].id == "tiny-chat"
        # one request runs, one waits, the next is refused with 429
        long = dict(model="tiny-chat", prompt="x", max_tokens=4000, stream=True, **GREEDY)
        running = client.completions.create(**long)
        next(iter(running))
        waiting = client.completions.create(**long)
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.completions.create(model="tiny-chat", prompt="x", max_tokens=2)
        running.close()
        waiting.close()
        assert wait_for(s, lambda m: m["nanoseek_running_requests"] == 0 and m["nanoseek_waiting_requests"] == 0)[
            "nanoseek_waiting_requests"] == 0
        assert client.completions.create(model="tiny-chat", prompt="x", max_tokens=2).choices[0].finish_reason
    finally:
        s.stop()


def engine_process_of(server: Server) -> int:
    """The pid of the server's engine process (a multiprocessing spawn child; not its resource tracker)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    for pid in children:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in command:
            return int(pid)
    raise AssertionError(f"no engine process among {children}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the engine process through /proc")
def test_when_the_engine_process_dies_requests_get_503_and_health_says_so(model_dir, tmp_path):
    s = Server(model_dir, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.completions.create(model="tiny-chat", prompt="x", max_tokens=3000, stream=True, **GREEDY)
        next(iter(stream))
        os.kill(engine_process_of(s), signal.SIGKILL)
        with pytest.raises(openai.APIError, match="generation failed"):  # an error event ends it; no hang
            list(stream)
        assert httpx.get(s.url + "/health").status_code == 503
        response = httpx.post(s.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "x", "max_tokens": 2})
        assert response.status_code == 503 and "engine process has stopped" in response.json()["error"]["message"]
        assert client.models.list().data[0].id == "tiny-chat"  # the HTTP side still answers
    finally:
        s.stop()


def test_stream_interval_sends_fewer_chunks_with_the_same_text(model_dir, tmp_path):
    """--stream-interval S: a stream's chunks come at least S apart, each with every token since the
    last; the text is the same as unstreamed. A negative interval is refused at start-up."""
    refused = subprocess.run([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model_dir),
                              "--stream-interval", "-1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--stream-interval" in refused.stderr
    s = Server(model_dir, tmp_path / "server.log", "--stream-interval", "0.25")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        request = dict(model="tiny-chat", prompt="def main():", max_tokens=64, **GREEDY)
        whole = client.completions.create(**request).choices[0].text
        start = time.perf_counter()
        pieces = [c.choices[0].text for c in client.completions.create(**request, stream=True) if c.choices]
        took = time.perf_counter() - start
        texts = [p for p in pieces if p]
        assert "".join(pieces) == whole
        assert len(texts) <= took / 0.25 + 2 and len(texts) < 64  # the first text at once, then one per interval
    finally:
        s.stop()


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_chat_page_streams_an_answer_in_chromium(server, client):
    playwright = pytest.importorskip("playwright.sync_api")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('tiny-chat')")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "96")
            page.fill("#input", "Hello, who are you?")
            # count how many times the answer's text changes while it arrives; watching the log from
            # before sending, since a fast server can finish before the answer's element is found
            page.evaluate("""() => { window.updates = 0; new MutationObserver(records => {
                for (const r of records) {
                    const node = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
                    if (node && node.closest('.msg.assistant')) window.updates++;
                } }).observe(document.getElementById('log'), {childList: true, characterData: true, subtree: true}); }""")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant")
            page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=30_000)
            answer, stats = page.text_content(".msg.assistant"), page.text_content("#stats")
            updates = page.evaluate("window.updates")
        finally:
            browser.close()
    expected = client.chat.completions.create(model="tiny-chat", max_tokens=96, temperature=0,
                                              messages=[{"role": "user", "content": "Hello, who are you?"}])
    assert answer == expected.choices[0].message.content
    assert updates > 1, "the answer appeared at once, not streamed"
    tokens, rate = re.match(r"(\d+) tokens · ([\d.]+) tokens/s", stats).groups()
    assert int(tokens) == expected.usage.completion_tokens and float(rate) > 0


def test_terminal_chat_keeps_the_conversation_and_resets(model_dir, client):
    script = "Hello there!\nTell me more.\n/reset\nHello there!\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "nanoseek.cli", "chat", "--model", str(model_dir), "--temperature", "0",
                          "--max-tokens", "8"], input=script, capture_output=True, text=True, timeout=120).stdout
    turns = re.findall(r">>> ((?:(?!>>> ).)*?)\n\((\d+) tokens in, (\d+) out", out, re.S)
    assert len(turns) == 3 and "(new conversation)" in out, out
    (reply1, in1, out1), (_, in2, _), (reply3, in3, _) = [(r, int(i), int(o)) for r, i, o in turns]
    assert in2 > in1 + out1  # the second turn carries the first question and answer
    assert in3 == in1 and reply3 == reply1  # after /reset the conversation starts over
    api = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello there!"}],
                                         max_tokens=8, temperature=0)
    assert reply1 == api.choices[0].message.content
