"""The OpenAI-compatible client (:mod:`transcoders.features.llm`) against the local server
(:mod:`transcoders.features.server`), both real, talking HTTP on loopback.

The served model is a tiny random Llama with a real (tiny, trained here) byte-level tokenizer;
what the server answers is checked against computations done here on the same model. A
test-only ASGI middleware records the requests that arrive and can inject outages.
"""

from __future__ import annotations

import json
import math
import socket
import time
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import requests
import torch
from conftest import build_tiny_tokenizer
from starlette.responses import JSONResponse

from transcoders.features.llm import LLMClient, LLMError
from transcoders.features.server import create_app, running_server, serve
from transcoders.models import adapter_for
from transcoders.models.loading import LoadedModel

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You explain features."},
            {"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]


def build_chat_model(context: int = 256) -> LoadedModel:
    """A 2-layer random Llama over the tiny tokenizer's vocabulary, with a chat template. Its
    weights are larger than the default initialisation, so next-token distributions are peaked
    and greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=context, initializer_range=0.3,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return LoadedModel("tiny-chat-llama", model, tok, adapter_for(model))


class Probe:
    """Test-only ASGI middleware: records each request's arrival (monotonic time, Authorization
    header); answers the next ``state["fail"]`` requests with HTTP 503 and ``Retry-After``; with
    ``state["drop_logprobs"]`` removes ``logprobs`` from the real responses."""

    def __init__(self, app, state: dict):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state["arrivals"].append((time.monotonic(), dict(scope["headers"]).get(b"authorization")))
        if self.state["fail"] > 0:
            self.state["fail"] -= 1
            outage = JSONResponse({"error": {"message": "injected outage"}}, status_code=503,
                                  headers={"Retry-After": self.state["retry_after"]})
            return await outage(scope, receive, send)
        if not self.state["drop_logprobs"]:
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = json.loads(b"".join(chunks))
        for choice in body.get("choices", []):
            choice["logprobs"] = None
        await JSONResponse(body, status_code=start["status"])(scope, receive, send)


@pytest.fixture(scope="module")
def lm(single_thread) -> LoadedModel:
    return build_chat_model()


@pytest.fixture(scope="module")
def server(lm):
    """The real server for ``lm`` on a free loopback port, wrapped in a :class:`Probe`."""
    app = create_app(lm)
    state = {"arrivals": [], "fail": 0, "retry_after": "0", "drop_logprobs": False}
    app.add_middleware(Probe, state=state)
    with running_server(app) as url:
        yield SimpleNamespace(url=url, app=app, state=state)


@pytest.fixture
def probe(server):
    """The probe's state, reset before and after the test."""
    server.state.update(arrivals=[], fail=0, retry_after="0", drop_logprobs=False)
    yield server.state
    server.state.update(arrivals=[], fail=0, retry_after="0", drop_logprobs=False)


def client(server, **kwargs) -> LLMClient:
    kwargs.setdefault("api_key_env", "TRANSCODERS_TEST_NO_KEY")
    return LLMClient(server.url, "tiny-chat-llama", **kwargs)


def prompt_ids(lm: LoadedModel, messages: list[dict]) -> torch.Tensor:
    """``[1, T]`` the chat prompt's tokens, as the server builds them."""
    tok = lm.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def next_token_logprobs(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """``[T, V]`` log_softmax of the model's logits at every position (one full forward, no cache)."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(ids, use_cache=False).logits[0].double(), dim=-1)


def post(server, endpoint: str, **body) -> requests.Response:
    return requests.post(f"{server.url}/{endpoint}", json=body, timeout=30)


# --- answers ------------------------------------------------------------------------------------
def test_models_and_chat_return_text(server, lm):
    models = requests.get(f"{server.url}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [lm.name]
    text = client(server).chat(MESSAGES, max_tokens=8)
    assert isinstance(text, str) and text


def test_greedy_chat_equals_model_generate(server, lm):
    ids = prompt_ids(lm, MESSAGES)
    eos = lm.tokenizer.eos_token_id
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                eos_token_id=eos, pad_token_id=eos)
    new = out[0, ids.shape[1]:].tolist()
    expected = lm.tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
    assert expected  # not a trivial "" == ""
    assert client(server).chat(MESSAGES, max_tokens=12) == expected

    # the log-probabilities of the generated tokens equal one full forward pass over the result
    r = post(server, "chat/completions", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["content"] == expected
    assert body["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                             "total_tokens": ids.shape[1] + len(new)}
    steps = body["choices"][0]["logprobs"]["content"]
    assert len(steps) == len(new)
    logp = next_token_logprobs(lm, out[:, : ids.shape[1] + len(new)])
    for i, (step, token) in enumerate(zip(steps, new)):
        row = logp[ids.shape[1] - 1 + i]
        assert step["token"] == lm.tokenizer.decode([token])
        assert step["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t["logprob"] for t in step["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert step["top_logprobs"][0]["logprob"] == pytest.approx(step["logprob"], abs=1e-6)  # greedy


def test_choice_logprobs_equal_next_token_log_softmax(server, lm):
    ids = prompt_ids(lm, MESSAGES)
    row = next_token_logprobs(lm, ids)[-1]
    top = torch.topk(row, 20).indices.tolist()
    texts = [lm.tokenizer.decode([t]) for t in top]
    norm = lambda s: s.strip().casefold()
    usable = [s for s in texts if norm(s)]
    # the most likely token as is; another one upper-cased with a leading space (matching
    # strips and case-folds); and one that is not among the top 20
    absent = next(s for s in (lm.tokenizer.decode([t]) for t in range(len(lm.tokenizer)))
                  if norm(s) and norm(s) not in {norm(x) for x in texts})
    choices = [usable[0], " " + usable[3].upper(), absent]
    expected = {c: max((float(row[t]) for t, s in zip(top, texts) if norm(s) == norm(c)), default=-math.inf)
                for c in choices}
    got = client(server).choice_logprobs(MESSAGES, choices)
    assert set(got) == set(choices)
    assert got[absent] == -math.inf
    for c in choices[:2]:
        assert math.isfinite(expected[c])
        assert got[c] == pytest.approx(expected[c], abs=1e-4)


def test_choice_logprobs_fall_back_to_the_generated_token(server, lm, probe):
    generated = client(server).chat(MESSAGES, max_tokens=1)
    assert generated.strip()
    probe["drop_logprobs"] = True
    got = client(server).choice_logprobs(MESSAGES, [generated.strip().upper(), "zz-not-it"])
    assert got == {generated.strip().upper(): 0.0, "zz-not-it": -math.inf}


def test_stop_strings_cut_the_text(server):
    full = post(server, "chat/completions", messages=MESSAGES, max_tokens=16, temperature=0).json()
    text = full["choices"][0]["message"]["content"]
    assert len(text) >= 8, text
    stop = text[4:7]
    cut = post(server, "chat/completions", messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop, "\x00never"]).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_sampling_is_reproducible_with_a_seed(server):
    def sample(seed: int) -> str:
        r = post(server, "chat/completions", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=seed)
        return r.json()["choices"][0]["message"]["content"]

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_plain_completions(server, lm):
    r = post(server, "completions", prompt="the state of the", max_tokens=4, temperature=0, logprobs=2)
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and isinstance(choice["text"], str)
    assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["top_logprobs"]) >= 1


# --- cache, retries, errors, rate limit ---------------------------------------------------------
def test_cache_answers_without_a_request_and_resumes(server, tmp_path):
    c = client(server, cache_dir=tmp_path)
    before = server.app.state.request_count
    first = c.chat(MESSAGES, max_tokens=6)
    assert server.app.state.request_count == before + 1 and (c.hits, c.misses) == (0, 1)
    assert c.chat(MESSAGES, max_tokens=6) == first
    assert server.app.state.request_count == before + 1 and (c.hits, c.misses) == (1, 1)
    assert len(list(tmp_path.rglob("*.json"))) == 1

    resumed = client(server, cache_dir=tmp_path)  # e.g. after an interrupted batch
    assert resumed.chat(MESSAGES, max_tokens=6) == first and resumed.hits == 1
    assert server.app.state.request_count == before + 1
    resumed.chat(MESSAGES, max_tokens=7)  # another request body: another key
    assert server.app.state.request_count == before + 2 and resumed.misses == 1


def test_retries_server_errors_honouring_retry_after(server, probe):
    expected = client(server).chat(MESSAGES, max_tokens=4)
    probe.update(arrivals=[], fail=2, retry_after="0.25")
    c = client(server, max_retries=3)
    c.backoff_s = 0.0  # without Retry-After the retries would come at once
    t0 = time.monotonic()
    assert c.chat(MESSAGES, max_tokens=4) == expected
    assert time.monotonic() - t0 >= 0.5
    times = [t for t, _ in probe["arrivals"]]
    assert len(times) == 3 and all(b - a >= 0.24 for a, b in zip(times, times[1:]))


def test_gives_up_after_max_retries(server, probe):
    probe.update(fail=5, retry_after="0")
    with pytest.raises(LLMError, match=r"after 2 attempt\(s\): HTTP 503: injected outage"):
        client(server, max_retries=1).chat(MESSAGES, max_tokens=2)
    assert len(probe["arrivals"]) == 2


def test_bad_requests_fail_at_once_with_the_server_message(server, probe):
    c = client(server, max_retries=5)
    with pytest.raises(LLMError, match=r"HTTP 400: messages\[0\]\.content is required"):
        c.chat([{"role": "user"}])
    with pytest.raises(LLMError, match=r"'max_tokens' must be an integer >= 1"):
        c.chat(MESSAGES, max_tokens=0)
    assert len(probe["arrivals"]) == 2  # no retries

    r = requests.post(f"{server.url}/chat/completions", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(server, "chat/completions", max_tokens=3)
    assert r.status_code == 400 and "'messages' is required" in r.json()["error"]["message"]
    r = post(server, "chat/completions", messages=MESSAGES, stream=True)
    assert r.status_code == 400 and "streaming" in r.json()["error"]["message"]


def test_unreachable_server_names_the_fix():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = LLMClient(f"http://127.0.0.1:{port}/v1", "m", api_key_env="TRANSCODERS_TEST_NO_KEY", max_retries=1)
    c.backoff_s = 0.01
    with pytest.raises(LLMError, match=rf"is the server at http://127.0.0.1:{port}/v1 running\?"):
        c.chat(MESSAGES)


def test_rate_limit_spaces_requests(server, probe):
    c = client(server, requests_per_minute=300)  # at least 0.2 s apart, across threads
    c.map(lambda i: c.chat([{"role": "user", "content": f"request {i}"}], max_tokens=1), range(3), workers=3,
          progress=False)
    times = sorted(t for t, _ in probe["arrivals"])
    assert len(times) == 3
    # unlimited, the three threads would send at once; allow 50 ms of scheduling jitter
    assert all(b - a >= 0.15 for a, b in zip(times, times[1:])), times
    assert times[-1] - times[0] >= 0.38, times


def test_api_key_from_the_environment(server, probe, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_TEST_KEY", "sk-test-secret")
    c = client(server, api_key_env="TRANSCODERS_TEST_KEY")
    c.chat(MESSAGES, max_tokens=1)
    client(server).chat(MESSAGES, max_tokens=1)  # no key in the environment: no header
    assert [auth for _, auth in probe["arrivals"]] == [b"Bearer sk-test-secret", None]
    assert "secret" not in repr(c)
    with pytest.raises(ValueError, match="not the key itself"):
        LLMClient(server.url, "m", api_key_env="sk-test-secret")


def test_map_keeps_order_and_reraises(server):
    c = client(server)
    assert c.map(lambda x: x * x, range(10), workers=4, progress=False) == [x * x for x in range(10)]
    started = []

    def fn(x):
        started.append(x)
        if x == 1:
            raise KeyError("boom")
        time.sleep(0.05)
        return x

    with pytest.raises(KeyError, match="boom"):
        c.map(fn, range(50), workers=2, progress=False)
    assert len(started) < 50  # the rest were cancelled


def test_server_listens_on_loopback_only(server):
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    assert host == "127.0.0.1" and port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=5):  # bound to 127.0.0.1 only
        pass
    import inspect

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


# --- the real default model ---------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_server_answers(single_thread):
    from transcoders.models.loading import load_model

    lm = load_model()
    with running_server(lm) as url:
        c = LLMClient(url, lm.name, api_key_env="TRANSCODERS_TEST_NO_KEY")
        text = c.chat([{"role": "user", "content": "Name a colour."}], max_tokens=12)
        assert text.strip()
        question = [{"role": "user", "content": "Is Paris the capital of France? Answer Yes or No."}]
        got = c.choice_logprobs(question, ["Yes", "No"])
        assert all(math.isfinite(v) for v in got.values()), got
