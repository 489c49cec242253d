"""The OpenAI API's wire format: request schemas (checked strictly), error JSON, response and chunk JSON."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_jax.generate.batcher import TOP_LOGPROBS, Request
from llama_jax.tokenizer import Tokenizer

MAX_BODY_BYTES = 16 << 20  # a larger body is refused with 413: on its Content-Length, or once that much is read
MAX_STOP_CHARS = 1000  # characters of one stop string (each token's text is searched for every stop)
MAX_SEED = 2**32  # seeds are in [0, 2**32): the sampler's key takes 32 bits (as generate's)


class APIError(Exception):
    """An error the client caused (or an overload), sent as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    """Fields are checked strictly (no "0.5" for a number, no true for an int); unknown fields are
    ignored, as OpenAI's API ignores them."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """The fields both endpoints take (OpenAI's defaults: temperature 1, top_p 1)."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(0, ge=0)  # not OpenAI's, as vLLM's extension: 0 or None = off
    n: int = 1
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check_supported(self, vocab_size: int) -> None:
        """Refuse, clearly, settings this server does not implement (instead of ignoring them) and
        values out of the model's range."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise APIError(400, f"top_k must be 0 or null (off) or in [1, {vocab_size}] (the vocabulary), got "
                                f"{short(self.top_k)}", "top_k")
        if self.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request) on this server, got {self.n}; send "
                                "separate requests with different seeds instead", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name} is not supported by this server (only 0)", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must be non-empty", "stop")
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop strings (as OpenAI's API), got {len(stops)}", "stop")
        for s in stops:
            if len(s) > MAX_STOP_CHARS:
                raise APIError(400, f"a stop string may hold at most {MAX_STOP_CHARS} characters, got {len(s)}",
                               "stop")
            text_bytes(s, "stop")


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    def check_supported(self, vocab_size: int) -> None:
        super().check_supported(vocab_size)
        if self.echo:
            raise APIError(400, "echo is not supported by this server", "echo")
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of must be 1 on this server, got {self.best_of}", "best_of")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


def parse(body: bytes, schema: type[_Strict]) -> Any:
    """The request body as `schema`, or an APIError naming the field and what was expected."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body's JSON nests too deeply to parse") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, data) from None


def _validation_error(e: ValidationError, data: dict) -> APIError:
    """One clear message for the first field that is wrong (all alternatives of a union at once)."""
    errors = e.errors()
    field = errors[0]["loc"][0]
    same = [x for x in errors if x["loc"] and x["loc"][0] == field]
    where = ".".join(str(part) for part in errors[0]["loc"])
    if errors[0]["type"] == "missing":
        return APIError(400, f"{where}: this field is required", str(field))
    if len(same) > 1 and all(len(x["loc"]) >= 2 for x in same):  # a union: name every accepted form
        forms = sorted({str(x["loc"][1]) for x in same})
        got = data.get(field)
        return APIError(400, f"{field}: expected one of {', '.join(forms)}; got {type(got).__name__} {short(got)}",
                        str(field))
    return APIError(400, f"{where}: {errors[0]['msg']}; got {short(errors[0].get('input'))}", str(field))


def short(value: Any) -> str:
    """A value for an error message: JSON (ASCII: a lone surrogate is escaped), at most 60 characters."""
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def text_bytes(text: str, field: str) -> int:
    """The UTF-8 size of a text a client sent, or a 400 naming the field (a lone surrogate, e.g. "\\ud800"
    in the JSON, is not text: it cannot be encoded)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise APIError(400, f"{field}: not valid Unicode text: a lone surrogate {short(text[e.start])} at "
                            f"character {e.start}", field.split(".")[0]) from None


def check_text_size(size: int, field: str, max_tokens: int, piece_bytes: int) -> None:
    """Refuse, before tokenizing it, a text that cannot fit `max_tokens`: no token covers more than
    `piece_bytes` bytes of text (the tokenizer's longest piece)."""
    if size > max_tokens * piece_bytes:
        raise APIError(400, f"{field}: {size} bytes of text cannot fit the context of {max_tokens} tokens (no token "
                            f"covers more than {piece_bytes} bytes: at most {max_tokens * piece_bytes} bytes); "
                            "shorten it", field.split(".")[0], code="context_length_exceeded")


def prompt_ids(body: CompletionRequest, tokenizer: Tokenizer, max_tokens: int, piece_bytes: int) -> list[int]:
    """The token ids of a completion request's one prompt: text gets BOS (as Generator.complete);
    a token-id list is used as given. Text that cannot fit `max_tokens` is refused untokenized."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: one prompt per request on this server, got a batch of {len(prompt)}; "
                                "send them as separate (concurrent) requests", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text_size(text_bytes(prompt, "prompt"), "prompt", max_tokens, piece_bytes)
        ids = tokenizer.encode(prompt, bos=True)
    else:
        ids = list(prompt)
    if not ids:
        raise APIError(400, "prompt: an empty token list; give at least one token (e.g. BOS = 1)", "prompt")
    return ids


def dialog_ids(body: ChatRequest, tokenizer: Tokenizer, max_tokens: int, piece_bytes: int) -> list[int]:
    """The chat prompt's token ids (a "developer" message is a system message); messages whose text
    together cannot fit `max_tokens` are refused untokenized."""
    size = sum(text_bytes(m.text(), f"messages.{i}.content") for i, m in enumerate(body.messages))
    check_text_size(size, "messages", max_tokens, piece_bytes)
    dialog = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        return tokenizer.encode_dialog(dialog)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", "messages") from None


# --- responses ---------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(request: Request) -> dict:
    prompt, completion = len(request.prompt), len(request.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text for logprobs (a lone byte of a longer character as a \\xNN escape)."""
    return tokenizer.token_bytes(token).decode(errors="backslashreplace")


def completion_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float], top: list[list],
                        offsets: list[int]) -> dict:
    """The completions API's logprobs object for some tokens."""
    return {"tokens": [token_text(tokenizer, t) for t in tokens], "token_logprobs": logprobs,
            "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in alternatives} for alternatives in top],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float], top: list[list]) -> dict:
    """The chat API's logprobs object ({"content": [...]}) for some tokens."""
    def entry(token: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, token), "logprob": lp, "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, alt) for i, alt in alternatives]}
                        for t, lp, alternatives in zip(tokens, logprobs, top)]}


def completion(id: str, model: str, created: int, text: str, finish_reason: str | None, logprobs: dict | None,
               usage_: dict | None) -> dict:
    """A completions response, or one streamed chunk of it (same object type, as OpenAI sends)."""
    out = {"id": id, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def chat_completion(id: str, model: str, created: int, text: str, finish_reason: str | None,
                    logprobs: dict | None, usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(id: str, model: str, created: int, obj: str, usage_: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {"id": id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def now() -> int:
    return int(time.time())
