"""Regressions in the server, the chat page and the text-side commands: stream waits on Python
3.10, OpenAI fields the server cannot honour, the terminal chat's engine thread at exit, multi-byte
stop strings, a port already in use, a closed output pipe, and Reset during a streamed reply."""

import asyncio
import io
import socket
import subprocess
import sys
import types
from argparse import Namespace
from pathlib import Path

import pytest

from nanoseek.inference.text import StopStrings
from nanoseek.tokenizer import Tokenizer

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from nanoseek.serve import chat, server  # noqa: E402
from nanoseek.serve.textgen import load_generator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = "/usr/bin/chromium"
INDEX = Path(server.__file__).parent / "static" / "index.html"


def test_a_stream_interval_wait_that_times_out_on_python_310_does_not_end_the_stream(monkeypatch):
    # before 3.11, asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin TimeoutError
    class Py310Timeout(Exception):
        pass

    async def wait_for(awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise Py310Timeout() from None

    shim = types.SimpleNamespace(**{**vars(asyncio), "TimeoutError": Py310Timeout, "wait_for": wait_for})
    monkeypatch.setattr(server, "asyncio", shim)

    async def main():
        batch = object.__new__(server._Batch)
        batch.queue, batch.ended, batch._open = asyncio.Queue(), asyncio.Event(), 1
        event = types.SimpleNamespace(finished=False)
        updates = batch.updates(interval=0.05)
        batch.queue.put_nowait((0, "a", event))
        first = await updates.__anext__()
        batch.queue.put_nowait((0, "b", event))  # at once after the first, so its update waits out the interval
        second = await asyncio.wait_for(updates.__anext__(), 10)
        batch.queue.put_nowait((0, "c", types.SimpleNamespace(finished=True)))
        return first, second, [u async for u in updates]

    first, second, rest = asyncio.run(main())
    assert first[0][0] == "a" and second[0][0] == "b" and rest[0][0][0] == "c"


def test_openai_fields_the_server_cannot_honour_are_refused_not_ignored(tiny_served_model):
    generator = load_generator(tiny_served_model, max_batch_size=2, max_seq_len=64)
    with TestClient(server.create_app(generator, model_name="tiny")) as client:
        def post(path, **fields):
            body = {"model": "tiny", "max_tokens": 2, **fields}
            if path == "/v1/chat/completions":
                body["messages"] = [{"role": "user", "content": "hi"}]
            else:
                body["prompt"] = "def"
            return client.post(path, json=body)

        for path, fields, word in [
                ("/v1/completions", dict(logit_bias={"5": -100}), "logit_bias"),
                ("/v1/chat/completions", dict(logit_bias={"5": 100}), "logit_bias"),
                ("/v1/chat/completions", dict(response_format={"type": "json_object"}), "response_format"),
                ("/v1/chat/completions", dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
                ("/v1/chat/completions", dict(tool_choice="required"), "tool_choice"),
                ("/v1/chat/completions", dict(functions=[{"name": "f"}]), "functions"),
                ("/v1/chat/completions", dict(top_logprobs=3), "logprobs")]:
            r = post(path, **fields)
            assert r.status_code == 400 and word in r.json()["error"]["message"], (fields, r.text)
        # what asks for nothing the server lacks still works
        for path, fields in [("/v1/completions", dict(logit_bias={})),
                             ("/v1/chat/completions", dict(response_format={"type": "text"}, tool_choice="none",
                                                           logit_bias=None, tools=None, top_logprobs=None))]:
            r = post(path, **fields)
            assert r.status_code == 200, (fields, r.text)
        assert client.get("/health").status_code == 200


def test_the_terminal_chat_stops_its_engine_thread_before_returning(tiny_served_model, monkeypatch, capsys):
    # a daemon engine thread still alive when the interpreter exits can abort it ("terminate called
    # without an active exception", exit 134), as `nanoseek chat --speculative 1` did at Ctrl-D
    generators = []

    def load(*args, **kwargs):
        generators.append(load_generator(*args, **kwargs))
        return generators[-1]

    monkeypatch.setattr(chat, "load_generator", load)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    args = Namespace(model=str(tiny_served_model), system=None, temperature=0.0, top_p=1.0, max_tokens=3, seed=None,
                     max_seq_len=64, dtype=None, device="cpu", speculative=0, compile=False)
    assert chat.run(args) == 0
    assert "3 out" in capsys.readouterr().out  # it did chat
    thread = generators[0].engine._thread
    assert thread is None or not thread.is_alive()


def test_stop_strings_of_multibyte_characters_are_found(tiny_served_model):
    tok = Tokenizer.load(tiny_served_model)
    ids = tok.encode("x = 1 日本語 done")
    stop = StopStrings(tok.decode, ["日本語"])
    # byte-level tokens: the three characters take more tokens than characters (+ 4)
    hits = [n for n in range(1, len(ids) + 1) if stop(ids[:n])]
    assert hits and "日本語" in tok.decode(ids[:hits[0]]) and "日本語" not in tok.decode(ids[:hits[0] - 1])


def test_serve_on_a_port_in_use_is_a_one_line_error_before_the_model_loads(tiny_served_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(tiny_served_model), "--in-process",
                              "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"nanoseek serve: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_generate_into_a_closed_pipe_stops_quietly(tiny_served_model):
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "generate", str(tiny_served_model), "--prompt", "def",
                             "--max-new-tokens", "50", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `| head` does once it has read enough
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_reset_during_a_reply_does_not_carry_it_into_the_new_conversation():
    playwright = pytest.importorskip("playwright.sync_api")
    # the page on its own, its fetch answering /v1/models and streaming one chunk of a reply that
    # does not end until it is aborted; what each chat request sent is kept
    fake_fetch = """
      window.sent = [];
      window.fetch = async (url, options) => {
        if (url === "/v1/models") return new Response(JSON.stringify({data: [{id: "m", max_model_len: 64}]}));
        window.sent.push(JSON.parse(options.body));
        const body = new ReadableStream({start(controller) {
          controller.enqueue(new TextEncoder().encode(
            'data: {"choices": [{"index": 0, "delta": {"content": "partial"}}]}\\n\\n'));
          options.signal.addEventListener("abort", () => controller.error(new DOMException("aborted", "AbortError")));
        }});
        return new Response(body, {headers: {"Content-Type": "text/event-stream"}});
      };"""
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            page.add_init_script(fake_fetch)
            page.goto(INDEX.as_uri())
            page.wait_for_selector("#model:has-text('64-token context')")
            page.fill("#input", "one")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant:has-text('partial')")
            page.click("#reset")
            page.wait_for_function("document.getElementById('send').textContent === 'Send'")
            page.fill("#input", "two")
            page.press("#input", "Enter")
            page.wait_for_function("window.sent.length === 2")
            sent = page.evaluate("window.sent")
        finally:
            browser.close()
    assert sent[1]["messages"] == [{"role": "user", "content": "two"}]
