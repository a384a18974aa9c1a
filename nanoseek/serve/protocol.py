"""The OpenAI request bodies the server accepts, and OpenAI-style errors.

Bodies are validated strictly (a string where a number belongs is an error, not a conversion, and
so are NaN and infinities) and every error becomes OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, so clients report it as they would OpenAI's. Fields the engine cannot honour
are refused with a message saying so rather than silently ignored. Extensions with vLLM's names:
top_k, min_p, repetition_penalty, ignore_eos. `null` for a field that has a default means that
default: OpenAI documents its optional fields as nullable, and its clients send null for ones left unset.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..inference.sampling import INT64_LIMIT  # the engine holds top_k and seed as int64

MAX_STOP_STRINGS = 4  # as OpenAI
# every step searches a request's new text, and holds back its tail, against each stop string: work
# that grows with their length, done on the engine's thread for all requests at once
MAX_STOP_LENGTH = 256  # characters


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        if not isinstance(data, dict):
            return data
        defaulted = {name for name, f in cls.model_fields.items() if not f.is_required() and f.get_default() is not None}
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _has_payload(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' content part needs a 'text' string")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an 'image_url' content part needs an 'image_url' object with a 'url'")
        return self


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        """The {'role', 'content'} dict the tokenizer's chat template takes (developer = system)."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return {"role": role, "content": self.content or ""}
        return {"role": role, "content": [p.model_dump(exclude_none=True) for p in self.content]}

    @property
    def images(self) -> list[str]:
        return [p.image_url.url for p in self.content if p.type == "image_url"] if isinstance(self.content, list) else []


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat completions and completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=INT64_LIMIT)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict | None = None
    # vLLM's extensions
    top_k: int = Field(0, ge=-1, lt=INT64_LIMIT)  # 0 or -1: no limit
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported (send several requests; they share the engine's batch)")
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported; use repetition_penalty")
        if self.logit_bias:  # ignoring it would hand back tokens the client asked never to see
            raise ValueError("logit_bias is not supported")
        return self

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        longest = max(map(len, [stop] if isinstance(stop, str) else stop or []), default=0)
        if longest > MAX_STOP_LENGTH:
            raise ValueError(f"a stop string may have at most {MAX_STOP_LENGTH} characters, got {longest}")
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    # asking for JSON or for tool calls and getting free text back would look like the model's doing
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None  # OpenAI's older names for tools and tool_choice
    function_call: str | dict | None = None

    @model_validator(mode="after")
    def _no_extras(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported (no JSON mode)")
        # "none" and "auto" with no tools both mean plain text, which is what the model gives
        if self.tools or self.functions or self.tool_choice not in (None, "none", "auto") \
                or self.function_call not in (None, "none", "auto"):
            raise ValueError("tools, tool_choice, functions and function_call are not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # one prompt as text or token ids, or a batch of them
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _no_extras(self):
        if self.echo or self.logprobs is not None or self.suffix is not None or self.best_of not in (None, 1):
            raise ValueError("echo, logprobs, suffix and best_of are not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be an empty list")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


def parse(model: type[_Body], body: bytes):
    """Validate a JSON body, or raise APIError(400) naming the first thing wrong with it."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {error['msg']}", code="invalid_json") from None
        # union members add their type names to the location; keep only the field path
        path = [str(p) for p in error["loc"] if isinstance(p, int) or p in _FIELD_NAMES]
        param = ".".join(path) or None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "a required field is missing"
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None


_FIELD_NAMES = {name for m in (ChatCompletionRequest, CompletionRequest, Message, ContentPart, ImageURL, StreamOptions)
                for name in m.model_fields}
