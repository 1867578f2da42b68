"""A client for OpenAI-compatible chat endpoints: retries, rate limiting and an on-disk cache.

Explanations and their scores (detection, fuzzing: Paulo et al. 2024, "Automatically
interpreting millions of features in large language models"; Bills et al. 2023) come from any
OpenAI-compatible endpoint: OpenAI itself, vLLM, llama.cpp, or, offline, the local server of
:mod:`.server`. With ``cache_dir`` set, every successful response is kept on disk, so the same
request is never paid for twice and an interrupted batch resumes from what is cached.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import requests

from ..files import atomic_write_json

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOP_LOGPROBS = 20  # the most OpenAI's API returns


class LLMError(OSError):
    """A request failed (after any retries) or its response is unusable; the message names the
    problem and the fix."""


def _normalise(token: str) -> str:
    return token.strip().casefold()


def _server_message(response: requests.Response) -> str:
    """The error message in an error response (OpenAI style ``{"error": {"message"}}`` or not)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:500]


def _retry_after(response: requests.Response) -> float | None:
    """The ``Retry-After`` header in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class LLMClient:
    """A thread-safe client of an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. ``"https://api.openai.com/v1"`` or ``"http://127.0.0.1:8000/v1"``.
        model: the model name sent with every request.
        api_key_env: the environment variable holding the API key (read once, here). When it is
            unset no ``Authorization`` header is sent, which suits a local server.
        cache_dir: where to keep responses (one JSON file per request); None: no cache.
        max_retries: retries after a connection error, a timeout, HTTP 429 or 5xx.
        requests_per_minute: the most requests sent per minute (spaced at least
            ``60 / requests_per_minute`` seconds apart, across threads); None: no limit.
        timeout_s: the connect and read timeout of one request, in seconds.

    Attributes:
        hits: responses served from the cache.
        misses: responses not found in the cache (each one sends a request, or more with retries).
        backoff_s: the delay before the first retry, in seconds; doubled on each further retry
            (up to ``max_backoff_s``), times a random factor in [0.5, 1). A server's
            ``Retry-After`` replaces it.

    Raises:
        ValueError: an argument is out of range, or ``api_key_env`` looks like a key itself.
    """

    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 cache_dir: str | Path | None = None, max_retries: int = 5,
                 requests_per_minute: float | None = None, timeout_s: float = 120.0):
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if api_key_env.startswith("sk-") or not api_key_env.replace("_", "").isalnum():
            raise ValueError("api_key_env is the name of the environment variable holding the key "
                             "(e.g. 'OPENAI_API_KEY'), not the key itself")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if requests_per_minute is not None and not requests_per_minute > 0:
            raise ValueError(f"requests_per_minute must be > 0 (or None for no limit), got {requests_per_minute}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_retries = max_retries
        self.requests_per_minute = requests_per_minute
        self.timeout_s = timeout_s
        self.hits = 0
        self.misses = 0
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_slot = 0.0
        self._rate_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._local = threading.local()
        self._warned_no_logprobs = False

    def __repr__(self) -> str:
        return (f"LLMClient({self.base_url!r}, {self.model!r}, api_key_env={self.api_key_env!r}, "
                f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r})")

    @property
    def is_loopback(self) -> bool:
        """Whether ``base_url`` points at this machine."""
        return urlparse(self.base_url).hostname in LOOPBACK_HOSTS

    # --- the two calls ---------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, max_tokens: int = 200, temperature: float = 0.0) -> str:
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        Args:
            max_tokens: the most tokens to generate.
            temperature: 0 is greedy (deterministic on most servers).

        Raises:
            LLMError: the request failed, or the response holds no message text.
        """
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        choice = self._post("chat/completions", body)["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            raise LLMError(f"the response from {self.base_url}/chat/completions has no message text "
                           f"(finish_reason={finish!r}); try a larger max_tokens or another model")
        return content

    def choice_logprobs(self, messages: list[dict], choices: Sequence[str]) -> dict[str, float]:
        """Log-probability (natural log) of each answer choice as the first token of the reply.

        Tokens match a choice after stripping whitespace and case-folding (``" yes"`` matches
        ``"Yes"``; the most likely matching token counts), so choices should be single tokens.
        A choice absent from the top-20 alternatives gets ``-inf``. When the server returns no
        log-probabilities, the generated text decides: 0.0 for the choice it matches, ``-inf``
        for the others.

        Raises:
            ValueError: ``choices`` is empty or holds a blank choice.
            LLMError: the request failed.
        """
        keys = {c: _normalise(c) for c in choices}
        if not keys or not all(keys.values()):
            raise ValueError(f"choices must be non-empty strings, got {list(choices)!r}")
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        choice = self._post("chat/completions", body)["choices"][0]
        out = {c: float("-inf") for c in keys}
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(content, list) and content and isinstance(content[0], dict):
            first = content[0]
            candidates = [*(first.get("top_logprobs") or []), first]
            for cand in candidates:
                if not isinstance(cand, dict):
                    continue
                token, lp = cand.get("token"), cand.get("logprob")
                if not isinstance(token, str) or isinstance(lp, bool) or not isinstance(lp, int | float):
                    continue
                for c, key in keys.items():
                    if _normalise(token) == key:
                        out[c] = max(out[c], float(lp))
            return out
        if not self._warned_no_logprobs:
            self._warned_no_logprobs = True
            log.warning("%s returned no logprobs; choice_logprobs falls back to the generated token (0 or -inf)",
                        self.base_url)
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        generated = _normalise(text) if isinstance(text, str) else None
        for c, key in keys.items():
            if key == generated:
                out[c] = 0.0
        return out

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1, progress: bool = True) -> list[R]:
        """``[fn(item) for item in items]``, run on ``workers`` threads, in the order of ``items``.

        On the first error, items not yet started are cancelled, running ones finish, and that
        error is raised.
        """
        from tqdm.auto import tqdm

        todo = list(items)
        results: list[Any] = [None] * len(todo)
        bar = tqdm(total=len(todo), disable=not progress, desc=f"{self.model} requests", unit="item")
        try:
            if workers <= 1:
                for i, item in enumerate(todo):
                    results[i] = fn(item)
                    bar.update()
                return results
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(fn, item): i for i, item in enumerate(todo)}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
            return results
        finally:
            bar.close()

    # --- cache -------------------------------------------------------------------------------------
    def cache_key(self, endpoint: str, body: dict) -> str:
        """sha256 of (base_url, model, endpoint, request body): the name of the cache file."""
        blob = json.dumps([self.base_url, self.model, endpoint, body], sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir is not None else None

    def _count(self, hit: bool) -> None:
        with self._count_lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def _post(self, endpoint: str, body: dict) -> dict:
        """The response to ``body``, from the cache or the server (then cached)."""
        path = self._cache_path(self.cache_key(endpoint, body))
        if path is not None and path.is_file():
            try:
                response = json.loads(path.read_text(encoding="utf-8"))["response"]
                self._check(endpoint, response)
            except (OSError, ValueError, KeyError, TypeError, LLMError):
                log.warning("ignoring unreadable cache file %s", path)
            else:
                self._count(hit=True)
                return response
        self._count(hit=False)
        response = self._request(endpoint, body)
        self._check(endpoint, response)
        if path is not None:
            atomic_write_json(path, {"endpoint": endpoint, "request": body, "response": response}, indent=None)
        return response

    def _check(self, endpoint: str, response: Any) -> None:
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError(f"unexpected response from {self.base_url}/{endpoint} (no 'choices'): "
                           f"{json.dumps(response)[:300]}; is base_url an OpenAI-compatible API root (ending in /v1)?")

    # --- HTTP ----------------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _wait_for_slot(self) -> None:
        """Sleep until this thread may send (reserving slots ``60 / requests_per_minute`` s apart)."""
        if not self._interval:
            return
        with self._rate_lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
        if slot > now:
            time.sleep(slot - now)

    def _backoff(self, retry: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**retry) * (0.5 + 0.5 * random.random())

    def _request(self, endpoint: str, body: dict) -> dict:
        url = f"{self.base_url}/{endpoint}"
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.max_retries + 1
        last, hint = "", ""
        for attempt in range(attempts):
            self._wait_for_slot()
            delay: float | None = None
            try:
                response = self._session().post(url, json=body, headers=headers, timeout=self.timeout_s)
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema) as exc:
                raise LLMError(f"cannot send to {url}: {exc}; check base_url") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
                last = f"{kind} ({type(exc).__name__})"
                hint = (f"is the server at {self.base_url} running?"
                        + (" (start one with transcoders.features.server.serve())" if self.is_loopback else "")
                        if not isinstance(exc, requests.Timeout) else
                        f"the server at {self.base_url} took over {self.timeout_s:g} s; raise timeout_s or lower max_tokens")
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise LLMError(f"{url} answered HTTP {status} with a body that is not JSON: "
                                       f"{response.text[:300]!r}; is base_url an OpenAI-compatible API root?") from None
                message = _server_message(response)
                if status != 429 and status < 500:
                    raise LLMError(f"{url} answered HTTP {status}: {message}{self._hint_4xx(status)}")
                last = f"HTTP {status}: {message}"
                hint = ("lower requests_per_minute" if status == 429 else f"check the server at {self.base_url}")
                delay = _retry_after(response)
            if attempt + 1 < attempts:
                delay = self._backoff(attempt) if delay is None else delay
                log.warning("%s: %s; retry %d/%d in %.2f s", url, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise LLMError(f"{url} failed after {attempts} attempt(s): {last}; {hint}")

    def _hint_4xx(self, status: int) -> str:
        if status in (401, 403):
            if self._api_key is None:
                return f" (set {self.api_key_env} to your API key)"
            return f" (check the API key in {self.api_key_env})"
        if status == 404:
            return f" (check base_url {self.base_url!r}, which usually ends in /v1, and the model name {self.model!r})"
        return ""
