"""A small OpenAI-compatible server for a local Hugging Face causal LM (CPU-friendly).

Explanations and scores (:mod:`.llm`) talk to any OpenAI-compatible endpoint; offline, this is
that endpoint. It serves one :class:`~transcoders.models.loading.LoadedModel`:

- ``GET /v1/models``: the one model.
- ``POST /v1/chat/completions``: ``messages`` go through the tokenizer's chat template (with the
  generation prompt). Honoured fields: ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (0 = greedy; default 1), ``top_p``, ``seed``, ``stop``, ``logprobs``,
  ``top_logprobs`` (0-20). ``n`` must be 1 and ``stream`` false; other fields are ignored.
- ``POST /v1/completions``: a plain ``prompt`` (tokenized with the tokenizer's special tokens);
  ``logprobs`` is the number of top alternatives (0-20), in the legacy format.

Log-probabilities are ``log_softmax`` of the model's raw next-token logits (temperature 1,
natural log), whatever the sampling temperature. The token that ends generation (EOS) is
listed in ``logprobs`` with its special-token text, so the distribution at the first position
is always visible even when the model stops at once; it is never part of the text.

Requests are served one at a time (a lock around generation). Invalid requests get HTTP 400
with an OpenAI-style ``{"error": {"message": ...}}`` body. There is no authentication: serve on
loopback (the default) only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..models.loading import DEFAULT_MODEL, LoadedModel

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 256
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    """The request is invalid; answered with HTTP 400 and this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


# --- request parsing ----------------------------------------------------------------------------
@dataclass
class _Params:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0: only the chosen token's


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be a number from {lo} to {hi}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{key}' must be an integer {bound}, got {value!r}", key)
    return value


def _common_params(body: dict) -> _Params:
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this server; send 'stream': false", "stream")
    if _integer(body, "n", 1, 1) != 1:
        raise BadRequest("only 'n': 1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    p = _Params(
        max_tokens=_integer(body, key, DEFAULT_MAX_TOKENS, 1) or DEFAULT_MAX_TOKENS,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
    )
    if p.top_p <= 0.0:
        raise BadRequest("'top_p' must be > 0", "top_p")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    p.stop = stop
    return p


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)", f"messages[{i}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of {'role': ..., 'content': ...}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"messages[{i}].role is required (e.g. 'system', 'user', 'assistant')", f"messages[{i}].role")
        if "content" not in m:
            raise BadRequest(f"messages[{i}].content is required", f"messages[{i}].content")
        out.append({"role": role, "content": _message_text(m["content"], i)})
    return out


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


# --- generation ---------------------------------------------------------------------------------
@dataclass
class _Step:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class _Generation:
    text: str
    finish_reason: str
    n_generated: int
    steps: list[_Step]
    text_offsets: list[int]  # start of each step's token in ``text`` (clipped to its length)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.tokenizer, "eos_token_id", None),
                   getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids


def _context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class _Generator:
    """Token-by-token generation with a KV cache, one request at a time."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.tokenizer: Any = lm.tokenizer
        self.lock = threading.Lock()
        self.eos = _eos_ids(lm)
        self.context = _context_length(lm.model)
        forward = getattr(lm.model, "forward", None)
        params = inspect.signature(forward).parameters if forward is not None else {}
        self.forward_kwargs: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # the KV cache argument (and output field) is ``cache`` in recent transformers, ``past_key_values`` before
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token: int) -> str:
        return self.decode([token], skip_special=False)

    def generate(self, prompt: list[int], p: _Params) -> _Generation:
        if not prompt:
            raise BadRequest("the prompt is empty (no tokens)")
        max_new = p.max_tokens
        if self.context is not None:
            if len(prompt) >= self.context:
                raise BadRequest(f"the prompt is {len(prompt)} tokens; {self.lm.name} takes at most "
                                 f"{self.context - 1} (its context is {self.context}). Shorten it.")
            max_new = min(max_new, self.context - len(prompt))
        with self.lock, torch.inference_mode():
            return self._generate(prompt, p, max_new)

    def _generate(self, prompt: list[int], p: _Params, max_new: int) -> _Generation:
        model = self.lm.model
        gen: torch.Generator | None = None
        if p.temperature > 0:
            gen = torch.Generator()
            if p.seed is not None:
                gen.manual_seed(p.seed)
            else:
                gen.seed()
        ids = torch.tensor([prompt], dtype=torch.long, device=_device(model))
        past = None
        steps: list[_Step] = []
        text_ids: list[int] = []  # generated tokens that belong to the text (no EOS)
        offsets: list[int] = []
        text, finish = "", "length"
        n_generated = 0
        for _ in range(max_new):
            out = model(input_ids=ids, use_cache=True, **{self.cache_arg: past}, **self.forward_kwargs)
            past = getattr(out, self.cache_arg, None)
            logits = out.logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logits)) if gen is None else _sample(logits, p.temperature, p.top_p, gen)
            top: list[tuple[int, float]] = []
            if p.top_logprobs:
                values, indices = torch.topk(logprobs, min(p.top_logprobs, logprobs.numel()))
                top = list(zip(indices.tolist(), values.tolist()))
            n_generated += 1
            steps.append(_Step(token, float(logprobs[token]), top))
            offsets.append(len(text))
            if token in self.eos:
                finish = "stop"
                break
            text_ids.append(token)
            text = self.decode(text_ids)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                keep = sum(1 for o in offsets if o < cut) or 1
                steps, offsets = steps[:keep], offsets[:keep]
                break
            # the next step reads the cache; a model that returned none gets the whole sequence again
            ids = torch.tensor([[token]] if past is not None else [prompt + [st.token for st in steps]],
                               dtype=torch.long, device=ids.device)
        return _Generation(text, finish, n_generated, steps, [min(o, len(text)) for o in offsets])


# --- responses ----------------------------------------------------------------------------------
def _usage(n_prompt: int, g: _Generation) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": g.n_generated, "total_tokens": n_prompt + g.n_generated}


def _chat_logprobs(gen: _Generator, g: _Generation) -> dict:
    def entry(token: int, lp: float) -> dict:
        text = gen.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in g.steps],
            "refusal": None}


def _completion_logprobs(gen: _Generator, g: _Generation) -> dict:
    top: list[dict[str, float]] = []
    for s in g.steps:
        d: dict[str, float] = {}
        for t, lp in s.top:
            text = gen.token_text(t)
            d[text] = max(d.get(text, float("-inf")), lp)
        top.append(d)
    return {"tokens": [gen.token_text(s.token) for s in g.steps], "token_logprobs": [s.logprob for s in g.steps],
            "top_logprobs": top, "text_offset": g.text_offsets}


def create_app(lm: LoadedModel) -> Starlette:
    """The OpenAI-compatible app serving ``lm`` (see the module docstring for the endpoints).

    ``app.state.request_count`` counts the requests that reached an endpoint (tests use it to
    see whether a client really sent a request); ``app.state.lm`` is the model.
    """
    generator = _Generator(lm)
    created = int(time.time())

    def count(request: Request) -> None:
        request.app.state.request_count += 1

    async def models(request: Request) -> JSONResponse:
        count(request)
        return JSONResponse({"object": "list", "data": [{"id": lm.name, "object": "model", "created": created,
                                                         "owned_by": "transcoders"}]})

    async def generate(prompt: list[int], p: _Params) -> _Generation:
        return await run_in_threadpool(generator.generate, prompt, p)

    async def answer(request: Request, build) -> JSONResponse:
        """Count the request and run ``build()`` (the response body): bad input is HTTP 400,
        anything else that fails HTTP 500, both in OpenAI's error format."""
        count(request)
        try:
            return JSONResponse(await build())
        except BadRequest as exc:
            return _error(400, str(exc), param=exc.param)
        except Exception as exc:
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")

    async def chat_completions(request: Request) -> JSONResponse:
        async def build() -> dict:
            body = await _json_body(request)
            messages = _messages(body)
            p = _common_params(body)
            if body.get("logprobs"):
                p.top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            elif body.get("top_logprobs"):
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            tok: Any = lm.tokenizer
            if not getattr(tok, "chat_template", None):
                raise BadRequest(f"the tokenizer of {lm.name} has no chat template; use /v1/completions with a plain prompt")
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # jinja errors: e.g. a template that refuses a role
                raise BadRequest(f"the chat template of {lm.name} rejected the messages: {exc}", "messages") from None
            prompt = list(tok(text, add_special_tokens=False)["input_ids"])
            g = await generate(prompt, p)
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": lm.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "logprobs": _chat_logprobs(generator, g) if p.top_logprobs is not None else None,
                             "finish_reason": g.finish_reason}],
                "usage": _usage(len(prompt), g),
            }

        return await answer(request, build)

    async def completions(request: Request) -> JSONResponse:
        async def build() -> dict:
            body = await _json_body(request)
            prompt_text = body.get("prompt")
            if isinstance(prompt_text, list) and len(prompt_text) == 1:
                prompt_text = prompt_text[0]
            if not isinstance(prompt_text, str) or not prompt_text:
                raise BadRequest("'prompt' is required: a non-empty string", "prompt")
            p = _common_params(body)
            p.top_logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
            tok: Any = lm.tokenizer
            prompt = list(tok(prompt_text)["input_ids"])
            g = await generate(prompt, p)
            return {
                "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": lm.name,
                "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason,
                             "logprobs": _completion_logprobs(generator, g) if p.top_logprobs is not None else None}],
                "usage": _usage(len(prompt), g),
            }

        return await answer(request, build)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.lm = lm
    app.state.request_count = 0
    return app


# --- running it ---------------------------------------------------------------------------------
def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load ``model`` (default SmolLM2-135M-Instruct; any name or path
    :func:`~transcoders.models.loading.load_model` takes) and serve it at
    ``http://HOST:PORT/v1`` until interrupted. Blocks.

    The server has no authentication: keep the loopback default unless the network is trusted.

    Raises:
        ModelLoadError: the model cannot be loaded.
        OSError: the port cannot be bound (e.g. already in use).
    """
    import uvicorn

    from ..models.loading import load_model

    if host not in LOOPBACK_HOSTS:
        log.warning("serving on %s: the server has no authentication; anyone who can reach it can use it", host)
    lm = load_model(model or DEFAULT_MODEL)
    uvicorn.run(create_app(lm), host=host, port=port, log_level="info")


@contextlib.contextmanager
def running_server(lm: LoadedModel | Starlette, port: int = 0, *, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``lm`` (a loaded model, or an app from :func:`create_app`) on 127.0.0.1 in a
    background thread; yield its base URL ``"http://127.0.0.1:PORT/v1"``; shut it down on exit.

    Args:
        lm: the model to serve, or a ready app (e.g. one a test wrapped in middleware).
        port: the TCP port; 0 picks a free one.
        startup_timeout_s: how long to wait for the server to accept connections, in seconds.

    Raises:
        OSError: the port cannot be bound.
        RuntimeError: the server did not start within ``startup_timeout_s``.
    """
    import uvicorn

    app = lm if isinstance(lm, Starlette) else create_app(lm)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        bound_port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"llm-server-{bound_port}",
                                  daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not server.started:
                if not thread.is_alive():
                    raise RuntimeError(f"the server on 127.0.0.1:{bound_port} failed to start (see the log above)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server on 127.0.0.1:{bound_port} did not start within {startup_timeout_s} s")
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", bound_port), timeout=startup_timeout_s):
                pass
            yield f"http://127.0.0.1:{bound_port}/v1"
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    finally:
        sock.close()
