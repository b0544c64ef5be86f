"""The OpenAI wire protocol of ``qtrain serve``, with no HTTP in it: the server's limits, request models and
their validation, and the response and stream-chunk builders. Every problem is an :class:`APIError` in OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qtrain.errors import QtrainError


class ServeConfigError(QtrainError, ValueError):
    """A server setting out of range; the message names it."""


@dataclass
class ServeConfig:
    model_id: str = "qtrain"
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    max_queue: int = 16  # requests waiting or running
    concurrency: int = 1
    timeout_s: float = 120.0  # one generation
    queue_timeout_s: float = 60.0  # waiting for a slot
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    # Host names a keyless server answers to (the bound address is added by ``qtrain serve``)
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_queue", "concurrency", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ServeConfigError(f"{name}={value!r}: must be a positive whole number")
        for name in ("timeout_s", "queue_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ServeConfigError(f"{name}={value!r}: must be a positive, finite number of seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeConfigError("api_key is empty; give a real key or none")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- requests

class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields qtrain ignores (user, presence_penalty=0, ...)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    seed: int | None = Field(None, ge=0, lt=2**63)


class CompletionRequest(BaseRequest):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url and the like: accepted, not used
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        # pydantic reports a failed union against its first member ("content.str: Input should be a valid
        # string"), which hides the part that is wrong; name it here instead
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict):
                    raise ValueError(f"content part {i} must be an object like {{'type': 'text', 'text': '...'}}")
                if part.get("text") is not None and not isinstance(part["text"], str):
                    raise ValueError(f"content part {i}: text must be a string, not {type(part['text']).__name__}")
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"content must be a string or a list of parts, not {type(value).__name__}")
        return value


class ChatRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def _union_tag(part) -> bool:
    """pydantic names the union member it tried inside an error's location ('prompt.str', 'content.list[Part]');
    OpenAI's ``param`` is the field path alone."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "dict", "list", "none"})


def parse_request(model: type[BaseModel], raw: bytes) -> Any:
    """A request body as ``model``; any problem is a 400 in OpenAI's error shape naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if not _union_tag(x)) or None
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where) from None


def check_limits(req: BaseRequest, max_tokens: int | None, cfg: ServeConfig) -> tuple[int, list[str]]:
    """The fields every request shares, against this server's limits: (max_tokens, stop sequences)."""
    if req.model not in (None, "", cfg.model_id):
        raise APIError(404, f"model {req.model!r} does not exist here; this server serves {cfg.model_id!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, "n must be 1 here (one completion per request)", param="n")
    if max_tokens is None:
        max_tokens = cfg.max_tokens
    if not 1 <= max_tokens <= cfg.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows 1 to {cfg.max_tokens} "
                            "(qtrain serve --max-tokens)", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(len(x) > 256 for x in stop):
        raise APIError(400, f"at most 4 stop sequences of up to 256 characters, got {len(stop)}", param="stop")
    return max_tokens, stop


def completion_prompt(req: CompletionRequest) -> str:
    """The one prompt string of a completions request (options qtrain does not implement are refused)."""
    for key, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None), ("suffix", req.suffix)):
        if bad:
            raise APIError(400, f"{key} is not supported by qtrain serve", param=key)
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
        return req.prompt[0]
    return req.prompt


def sampling_temperature(requested: float) -> float:
    # below 1e-4 the logits / temperature overflow float32 (NaN probabilities); that limit is greedy anyway
    return requested if requested >= 1e-4 else 0.0


# ---------------------------------------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish_reason for how a generation ended: a stop (EOS or a stop sequence), or anything else."""
    return "stop" if reason == "stop" else "length"


def sse(obj: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class CompletionChunks:
    """The ``text_completion`` objects of one request: streamed chunks and the final response share an id."""

    def __init__(self, model_id: str):
        self.id, self.created, self.model_id = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model_id

    def chunk(self, text: str, reason: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    def response(self, text: str, reason: str, use: dict) -> dict:
        return {**self.chunk(text, reason), "usage": use}


class ChatChunks:
    """The ``chat.completion.chunk`` objects of one request (the role goes in the first delta only), and the
    ``chat.completion`` response."""

    def __init__(self, model_id: str):
        self.id, self.created, self.model_id = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model_id
        self.sent_role = False

    def chunk(self, text: str, reason: str | None) -> dict:
        delta = {} if reason else {"content": text}
        if not self.sent_role:
            delta = {"role": "assistant", **delta}
            self.sent_role = True
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def response(self, text: str, reason: str, use: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}], "usage": use}
