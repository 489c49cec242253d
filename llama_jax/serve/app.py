"""The HTTP app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health, in
front of a continuous `Batcher` (FastAPI; the batcher runs in its own thread).

Each request becomes one `Request` in the batcher; its updates come back to the event loop
through an asyncio queue. A client that goes away (a closed stream, or a dropped connection while
waiting for a whole answer) cancels its request, which frees its slot before the next decode step.
Errors are OpenAI's error JSON: 400 a bad field (or a prompt longer than the context, code
context_length_exceeded), 401 a missing or wrong key, 404 an unknown model, 413 a huge body,
503 a full queue; nothing a client sends stops the server or another client's request. A body is
counted while it arrives (refused at MAX_BODY_BYTES, or at once on its Content-Length), then parsed,
checked and tokenized in a worker thread, so the event loop (other streams, /health) never waits
for it; a prompt that cannot fit the context is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import sys
import threading
from typing import AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI
from fastapi.requests import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from llama_jax.generate.batcher import Batcher, ContextTooLong, QueueFull, Request, Update
from llama_jax.serve import protocol as wire
from llama_jax.tokenizer import Tokenizer

SWITCH_INTERVAL_S = 0.0005  # while serving: how long a thread may hold the interpreter lock when another waits
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: our lines appear among its lines


def check_api_key(key: str | None, name: str = "api_key") -> None:
    """A key must be 1 or more visible ASCII characters: it travels as `Authorization: Bearer KEY`,
    where HTTP drops surrounding whitespace, so a key with spaces could never be sent as it is
    (and "" would silently mean no key). None = no key."""
    if key is None:
        return
    if not key:
        raise ValueError(f"{name} is empty; give a key or leave it out (no key: the server is open)")
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"{name} holds {'a space' if key[bad].isspace() else 'a character that is not visible ASCII'} "
                         f"at character {bad} of {len(key)}: a key is visible ASCII characters only (no spaces), "
                         "as it travels in an HTTP header")


class _Mailbox:
    """Updates from the batcher's thread to the event loop: one loop wake-up for all the updates of
    a decode step, not one per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue: asyncio.Queue, update: Update) -> None:
        with self.lock:
            self.items.append((queue, update))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, update in items:
            queue.put_nowait(update)


class _Job:
    """One request in the batcher, its updates delivered to the event loop."""

    def __init__(self, batcher: Batcher, request: Request, mailbox: _Mailbox) -> None:
        self.batcher, self.request, self.queue = batcher, request, asyncio.Queue()
        request.on_update = lambda update: mailbox.post(self.queue, update)

    def submit(self) -> None:
        try:
            self.batcher.submit(self.request)
        except QueueFull as e:
            raise wire.APIError(503, f"the server is busy: {e}", code="queue_full", kind="server_error") from None
        except ContextTooLong as e:
            raise wire.APIError(400, str(e), code="context_length_exceeded") from None
        except (ValueError, TypeError) as e:
            raise wire.APIError(400, str(e)) from None

    async def updates(self) -> AsyncIterator[Update]:
        """The request's updates until its last (a stream closed early, e.g. by a client that went
        away, cancels the request)."""
        try:
            while True:
                update = await self.queue.get()
                yield update
                if update.finish_reason is not None:
                    return
        finally:
            self.cancel()

    async def wait(self, http: HTTPRequest) -> None:
        """Wait for the whole answer; a client that disconnects meanwhile cancels the request at once."""
        async def disconnected() -> None:
            while (await http.receive())["type"] != "http.disconnect":  # the body is read: only this is left
                pass

        async def answered() -> None:
            async for _ in self.updates():
                pass

        tasks = [asyncio.ensure_future(disconnected()), asyncio.ensure_future(answered())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self.cancel()

    def cancel(self) -> None:
        if not self.request.done:
            self.batcher.cancel(self.request)


def create_app(batcher: Batcher, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = wire.MAX_BODY_BYTES) -> FastAPI:
    """The app; its lifespan starts the batcher's loop and stops it at shutdown. Raises ValueError
    for an api_key that cannot be sent (check_api_key)."""
    check_api_key(api_key)
    key_bytes = None if api_key is None else api_key.encode()
    piece_bytes = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    mailbox: _Mailbox | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        nonlocal mailbox
        mailbox = _Mailbox(asyncio.get_running_loop())
        # The batcher thread and the event loop share the interpreter lock; at Python's default 5 ms
        # switch interval the batcher waits up to 5 ms per decode step to hand tokens over.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        batcher.start()
        try:
            yield
        finally:
            batcher.close()
            sys.setswitchinterval(switch_interval)

    # No /openapi.json (nor /docs): the bodies are OpenAI's (parsed by hand, so FastAPI's schema
    # would describe none of them) and an open schema route would be the one route outside the key.
    app = FastAPI(title="llama_jax", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    created = wire.now()

    @app.exception_handler(wire.APIError)
    async def api_error(_: HTTPRequest, e: wire.APIError) -> JSONResponse:
        return JSONResponse(e.json(), status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(_: HTTPRequest, e: Exception) -> JSONResponse:  # a bug of ours: still OpenAI's JSON
        return JSONResponse(wire.APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").json(),
                            500)

    @app.exception_handler(404)
    async def not_found(request: HTTPRequest, _: Exception) -> JSONResponse:
        return JSONResponse(wire.APIError(404, f"no route {request.method} {wire.short(request.url.path)}").json(),
                            404)

    @app.exception_handler(405)
    async def wrong_method(request: HTTPRequest, _: Exception) -> JSONResponse:
        return JSONResponse(wire.APIError(405, f"{request.method} is not allowed on "
                                               f"{wire.short(request.url.path)}").json(), 405)

    def authorize(http: HTTPRequest) -> None:
        """With --api-key, every /v1 call needs `Authorization: Bearer KEY` (checked before anything
        else): the scheme in any case, one space, then exactly the key's bytes (compared in constant time)."""
        if key_bytes is not None:
            given = http.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(token.encode("latin-1"), key_bytes)):
                what = "no API key given (Authorization: Bearer KEY)" if not given else "incorrect API key"
                raise wire.APIError(401, what, code="invalid_api_key")

    async def read_body(http: HTTPRequest) -> bytes:
        """The request body, counted as it arrives: over max_body_bytes is a 413 at once (on the
        Content-Length before reading any, or as soon as the count passes it, chunked bodies too).
        A client gone mid-body is one line in the log."""
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise wire.APIError(413, f"the request body of {int(declared)} bytes exceeds the limit of "
                                     f"{max_body_bytes} bytes")
        chunks, size = [], 0
        try:
            async for chunk in http.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise wire.APIError(413, f"the request body exceeds the limit of {max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            client = f"{http.client.host}:{http.client.port}" if http.client else "a client"
            log.warning("%s went away while sending a request body (%d bytes of %s received)", client, size,
                        declared or "an unknown length")
            raise wire.APIError(400, "the request body was cut off") from None
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise wire.APIError(404, f"the model {wire.short(name)} does not exist; this server has "
                                     f"{wire.short(model_name)}", "model", code="model_not_found")

    def engine_request(body: wire.Sampling, ids: list[int], max_tokens: int | None, top_logprobs: int) -> Request:
        if max_tokens is None:  # up to the context
            max_tokens = max(1, batcher.max_seq_len - len(ids))
        seed = secrets.randbelow(wire.MAX_SEED) if body.seed is None else body.seed
        return Request(ids, max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k or 0,
                       seed=seed, stop=body.stop, top_logprobs=top_logprobs)

    async def admitted(http: HTTPRequest, prepare: Callable[[bytes], tuple]) -> tuple:
        """Authorize, read the body, then parse, check and tokenize it in a worker thread (prepare),
        and submit its request: (its job, the parsed body)."""
        authorize(http)
        raw = await read_body(http)
        request, body = await run_in_threadpool(prepare, raw)
        job = _Job(batcher, request, mailbox)
        job.submit()
        return job, body

    def prepare_completion(raw: bytes) -> tuple[Request, wire.CompletionRequest]:
        body = wire.parse(raw, wire.CompletionRequest)
        body.check_supported(tokenizer.vocab_size)
        check_model(body.model)
        ids = wire.prompt_ids(body, tokenizer, batcher.max_seq_len, piece_bytes)
        return engine_request(body, ids, body.max_tokens, body.logprobs or 0), body

    def prepare_chat(raw: bytes) -> tuple[Request, wire.ChatRequest]:
        body = wire.parse(raw, wire.ChatRequest)
        body.check_supported(tokenizer.vocab_size)
        check_model(body.model)
        ids = wire.dialog_ids(body, tokenizer, batcher.max_seq_len, piece_bytes)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        return engine_request(body, ids, body.max_completion_tokens or body.max_tokens, top), body

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "slots": len(batcher.slots), "live": batcher.live,
                "waiting": len(batcher.waiting), "served": batcher.served}

    @app.get("/v1/models")
    async def models(http: HTTPRequest) -> dict:
        authorize(http)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama_jax", "max_model_len": batcher.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        job, body = await admitted(http, prepare_completion)
        id, model, now, request = wire.new_id("cmpl"), model_name, wire.now(), job.request
        with_logprobs = body.logprobs is not None

        def logprobs(tokens, lps, top, offsets):
            return wire.completion_logprobs(tokenizer, tokens, lps, top, offsets) if with_logprobs else None

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                sent = 0
                async for u in job.updates():
                    if u.error:
                        yield wire.sse(wire.APIError(500, u.error, kind="server_error").json())
                        return
                    if u.text or u.tokens or u.finish_reason:
                        offsets = request.text_offsets[sent:sent + len(u.tokens)]
                        sent += len(u.tokens)
                        yield wire.sse(wire.completion(id, model, now, u.text, u.finish_reason,
                                                       logprobs(u.tokens, u.logprobs, u.top_logprobs, offsets), None))
                if include_usage:
                    yield wire.sse(wire.usage_chunk(id, model, now, "text_completion", wire.usage(request)))
                yield wire.sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        await finish(job, http)
        return wire.completion(id, model, now, request.text, request.finish_reason,
                               logprobs(request.tokens, request.logprobs, request.top, request.text_offsets),
                               wire.usage(request))

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        job, body = await admitted(http, prepare_chat)
        id, model, now, request = wire.new_id("chatcmpl"), model_name, wire.now(), job.request

        def logprobs(tokens, lps, alternatives):
            return wire.chat_logprobs(tokenizer, tokens, lps, alternatives) if body.logprobs else None

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                yield wire.sse(wire.chat_chunk(id, model, now, {"role": "assistant", "content": ""}, None))
                async for u in job.updates():
                    if u.error:
                        yield wire.sse(wire.APIError(500, u.error, kind="server_error").json())
                        return
                    if u.text or u.tokens:
                        yield wire.sse(wire.chat_chunk(id, model, now, {"content": u.text}, None,
                                                       logprobs(u.tokens, u.logprobs, u.top_logprobs)))
                    if u.finish_reason:
                        yield wire.sse(wire.chat_chunk(id, model, now, {}, u.finish_reason))
                if include_usage:
                    yield wire.sse(wire.usage_chunk(id, model, now, "chat.completion.chunk", wire.usage(request)))
                yield wire.sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        await finish(job, http)
        return wire.chat_completion(id, model, now, request.text, request.finish_reason,
                                    logprobs(request.tokens, request.logprobs, request.top), wire.usage(request))

    async def finish(job: _Job, http: HTTPRequest) -> None:
        await job.wait(http)
        if job.request.error:
            raise wire.APIError(500, job.request.error, kind="server_error")

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port), or OSError naming host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on a listening socket until interrupted (the CLI's main loop)."""
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread (tests, benchmarks); yields its base URL ("http://host:port").
    Its warnings go to Python's logging as they are (no handlers of uvicorn's own, bound to the
    stderr of the moment)."""
    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped while starting")
            threading.Event().wait(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
