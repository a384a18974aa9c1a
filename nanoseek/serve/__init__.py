"""Serving: the OpenAI-compatible HTTP server (`nanoseek serve`), its chat page, and `nanoseek chat`.

    nanoseek serve --model runs/chat/latest          # http://127.0.0.1:8000, chat page at /
    nanoseek chat --model runs/chat/latest           # terminal chat

The text layer both share (tokenizer + stop strings over the engine's token ids) is `textgen`,
built on inference/text.TextDecoder.
"""
