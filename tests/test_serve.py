"""The server against the official OpenAI client on loopback: answers, streaming, usage, multi-turn,
batching, the image-feature cache, and every refusal (after each hostile request the server still
answers). One bundled model is loaded for the module; small limits make the limit cases cheap."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("openai", reason="the server tests need the openai client (the dev extra)")
pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")

import openai  # noqa: E402

from llava_uhd.inference.generate import answer  # noqa: E402
from llava_uhd.serve.app import create_app  # noqa: E402
from llava_uhd.serve.batcher import Batcher  # noqa: E402
from llava_uhd.serve.build import build_server  # noqa: E402
from llava_uhd.serve.engine import Done  # noqa: E402
from llava_uhd.serve.limits import ServerLimits  # noqa: E402
from llava_uhd.serve.schema import parse_chat_request  # noqa: E402
from serve_helpers import EXAMPLE, data_url, image_message, png_bytes, running  # noqa: E402

LIMITS = ServerLimits(
    max_body_bytes=2_000_000,
    max_image_bytes=300_000,
    max_image_pixels=5_000_000,
    max_images=3,
    max_visual_tokens=600,
    max_prompt_tokens=900,
    max_tokens=64,
    max_queue=8,
)
QUESTION = "How many shapes are there?"


@pytest.fixture(scope="module")
def server():
    engine, batcher = build_server(None, limits=LIMITS, max_new_tokens=12, batch_window_s=0.05, device="cpu")
    with running(create_app(engine, batcher)) as url:
        yield engine, url
    batcher.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def example_url():
    return data_url(EXAMPLE.read_bytes(), "image/jpeg")


def _ask(client, messages, **options):
    return client.chat.completions.create(model="synthdoc-model", messages=messages, **options)


def _raw(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request(
        "POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read() or b"null")
    connection.close()
    return status, payload


def _still_answers(client) -> None:
    reply = _ask(client, [{"role": "user", "content": "Hello"}], max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_plain_answer_matches_the_library_and_reports_usage(server, client, example_url):
    engine, _ = server
    expected = answer(engine.model, engine.processor, [str(EXAMPLE)], QUESTION, max_new_tokens=12)
    reply = _ask(client, [image_message(example_url, QUESTION)], max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip() == expected
    usage = reply.usage
    plan = engine.processor.plan_images([(1280, 800)])[0]
    assert usage.slices == plan.num_slices == 6
    assert usage.vit_patches == plan.vit_patches
    assert usage.image_tokens == 6 * 37 + 36  # N * (Q + 1) + Q with Q = 36
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > usage.image_tokens


def test_streaming_gives_the_same_text_and_usage_last(client, example_url):
    messages = [image_message(example_url, QUESTION)]
    whole = _ask(client, messages, max_tokens=12)
    chunks = list(_ask(client, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_marker(server, example_url):
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    ).encode()
    parts = urlsplit(server[1])
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request(
        "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2][6:])  # no include_usage: no usage field


def test_multi_turn_with_the_image_in_an_earlier_turn(client, example_url):
    first = _ask(client, [image_message(example_url, QUESTION)], max_tokens=8)
    history = [
        image_message(example_url, QUESTION),
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what colour is the first one?"},
    ]
    reply = _ask(client, history, max_tokens=8)
    assert reply.usage.image_tokens == first.usage.image_tokens  # the earlier image is in the prompt
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens
    system = [{"role": "system", "content": "Answer briefly."}, *history]
    assert _ask(client, system, max_tokens=4).usage.prompt_tokens > 0


def test_max_tokens_stop_and_seed(client, example_url):
    messages = [image_message(example_url, QUESTION)]
    full = _ask(client, messages, max_tokens=12).choices[0].message.content
    one = _ask(client, messages, max_completion_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    if len(full) >= 2:
        stop = full[1]
        cut = _ask(client, messages, max_tokens=12, stop=[stop])
        assert cut.choices[0].message.content == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    sampled = [
        _ask(client, messages, max_tokens=6, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_beam_search_answers_as_the_library_and_arrives_whole_when_streamed(server, client, example_url):
    engine, _ = server
    expected = answer(engine.model, engine.processor, [str(EXAMPLE)], QUESTION, max_new_tokens=8, num_beams=3)
    messages = [image_message(example_url, QUESTION)]
    widths = []
    generate = engine.model.generate

    def spy(*args, **kwargs):  # the bundled model's beams agree with greedy: check the search ran
        widths.append(kwargs["num_beams"])
        return generate(*args, **kwargs)

    engine.model.generate = spy
    try:
        reply = _ask(client, messages, max_tokens=8, extra_body={"num_beams": 3})
        stream = _ask(client, messages, max_tokens=8, stream=True, extra_body={"num_beams": 3})
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    finally:
        del engine.model.generate
    assert widths == [3, 3]
    assert reply.choices[0].message.content.strip() == expected
    assert "".join(pieces) == reply.choices[0].message.content


def test_a_repeated_image_skips_the_vision_tower(server, client):
    engine, _ = server
    calls = []
    hook = engine.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    url = data_url(png_bytes(500, 260, (10, 120, 200)))
    hits = engine.cache.hits
    try:
        _ask(client, [image_message(url, QUESTION)], max_tokens=2)
        assert len(calls) == 1
        for _ in range(2):
            _ask(client, [image_message(url, "What colour is it?")], max_tokens=2)
        assert len(calls) == 1
        assert engine.cache.hits == hits + 2
    finally:
        hook.remove()


def test_an_image_two_requests_race_for_is_encoded_once(server):
    # Both requests miss the cache while it is empty and land in different batches: the second batch finds
    # the image the first one put in and runs no ViT.
    engine, url = server
    calls = []
    hook = engine.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    body = {
        "messages": [image_message(data_url(png_bytes(610, 330, (90, 30, 140))), QUESTION)],
        "max_tokens": 2,
    }
    first, second = (engine.prepare(parse_chat_request(json.dumps(body).encode())) for _ in range(2))
    encoded = _metrics(url)["llava_uhd_images_encoded_total"]
    answers: list[list] = [[], []]
    first.emit, second.emit = answers[0].append, answers[1].append
    try:
        assert first.images[0].entry is None and second.images[0].entry is None
        engine.run_batch([first])
        engine.run_batch([second])
    finally:
        hook.remove()
    assert len(calls) == 1
    assert _metrics(url)["llava_uhd_images_encoded_total"] == encoded + 1
    assert answers[0] == answers[1] and isinstance(answers[0][-1], Done)


def test_concurrent_requests_share_batches_and_match_one_at_a_time(server, client):
    engine, url = server
    images = [
        png_bytes(w, h, (40 * i, 90, 160))
        for i, (w, h) in enumerate([(300, 200), (700, 500), (1000, 340), (200, 640)])
    ]
    messages = [[image_message(data_url(b), QUESTION)] for b in images]
    alone = [_ask(client, m, max_tokens=6).choices[0].message.content for m in messages]  # also caches them
    before = _batch_counts(url)
    barrier = threading.Barrier(len(messages))
    together: list[str | None] = [None] * len(messages)

    def one(i: int) -> None:
        barrier.wait()
        together[i] = _ask(client, messages[i], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(messages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    batches, requests = (a - b for a, b in zip(_batch_counts(url), before, strict=True))
    assert requests == len(messages) and batches < len(messages)  # some shared a batch


def _batch_counts(url: str) -> tuple[int, int]:
    values = _metrics(url)
    return int(values["llava_uhd_batch_size_count"]), int(values["llava_uhd_batch_size_sum"])


def _metrics(url: str) -> dict[str, float]:
    text = _get(url, "/metrics")[1]
    return {
        k: float(v)
        for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("", "#"))
    }


def _get(url: str, path: str) -> tuple[int, str]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    result = response.status, response.read().decode()
    connection.close()
    return result


def test_models_health_metrics_and_plan(server, client):
    engine, url = server
    assert [m.id for m in client.models.list().data] == ["synthdoc-model"]
    status, health = _get(url, "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"
    status, metrics = _get(url, "/metrics")
    for name in (
        "requests_total",
        "errors_total",
        "queue_depth",
        "batch_size_count",
        "tokens_per_second",
        "image_cache_hits_total",
        "image_cache_misses_total",
        "images_encoded_total",
        'stage_seconds_total{stage="vit"}',
    ):
        assert f"llava_uhd_{name}" in metrics
    status, plan = _raw(url, "/v1/plan", EXAMPLE.read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 200
    assert plan["grid"] == {"rows": 2, "cols": 3} and plan["image_tokens"] == 258 and plan["slices"] == 6
    assert _raw(url, "/v1/plan", b"not an image")[0] == 400


def _half_png() -> bytes:
    data = png_bytes(64, 64)
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    return png_bytes(4000, 4000, mode="1")  # 16 Mpx in a few KB: over the 5 Mpx limit


def _chat(content, **fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **fields}).encode()


def _image_chat(url: str, **fields) -> bytes:
    return _chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}], **fields)


# (name, body, status, param, code or a word the message must contain)
HOSTILE = [
    ("malformed JSON", b'{"messages": [', 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_type"),
    ("wrong type", _chat("hi", max_tokens="5"), 400, "max_tokens", "invalid_type"),
    (
        "unknown role",
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
        400,
        "messages.0.role",
        "invalid_type",
    ),
    ("unknown part", _chat([{"type": "video", "url": "x"}]), 400, "messages.0.content.0", "invalid_type"),
    ("no messages", json.dumps({"messages": []}).encode(), 400, "messages", "invalid_type"),
    ("n > 1", _chat("hi", n=2), 400, "n", "invalid_type"),
    ("no beams", _chat("hi", num_beams=0), 400, "num_beams", "invalid_type"),
    ("too many beams", _chat("hi", num_beams=9), 400, "num_beams", "--max-beams"),
    (
        "bad base64",
        _image_chat("data:image/png;base64,@@@not base64@@@"),
        400,
        "messages.0.content.0.image_url.url",
        "invalid_base64",
    ),
    (
        "not an image",
        _image_chat(data_url(b"hello, world")),
        400,
        "messages.0.content.0.image_url.url",
        "invalid_image",
    ),
    (
        "truncated image",
        _image_chat(data_url(_half_png())),
        400,
        "messages.0.content.0.image_url.url",
        "invalid_image",
    ),
    (
        "wrong media type",
        _image_chat("data:text/html;base64,PGI+"),
        400,
        "messages.0.content.0.image_url.url",
        "invalid_data_url",
    ),
    (
        "file URL",
        _image_chat("file:///etc/passwd"),
        400,
        "messages.0.content.0.image_url.url",
        "unsupported_url",
    ),
    ("bare path", _image_chat("/etc/passwd"), 400, "messages.0.content.0.image_url.url", "unsupported_url"),
    (
        "remote off",
        _image_chat("http://example.com/a.png"),
        400,
        "messages.0.content.0.image_url.url",
        "remote_images_disabled",
    ),
    (
        "image bytes",
        _image_chat(data_url(b"\x89PNG\r\n\x1a\n" + bytes(400_000))),
        400,
        "messages.0.content.0.image_url.url",
        "--max-image-mb",
    ),
    (
        "image pixels",
        _image_chat(data_url(_bomb_png())),
        400,
        "messages.0.content.0.image_url.url",
        "--max-image-pixels",
    ),
    (
        "images per request",
        _chat([{"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}] * 4),
        400,
        "messages",
        "--max-images",
    ),
    (
        "visual tokens",
        _chat([{"type": "image_url", "image_url": {"url": data_url(png_bytes(1000, 700))}}] * 3),
        400,
        "messages",
        "--max-visual-tokens",
    ),
    ("prompt length", _chat("word " * 1200), 400, "messages", "--max-prompt-tokens"),
    ("max_tokens", _chat("hi", max_tokens=65), 400, "max_tokens", "--max-tokens-limit"),
    ("image tag in text", _chat("look <image> here"), 400, "messages.0.content", "invalid_value"),
    (
        "image from the assistant",
        json.dumps(
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}],
                    },
                    {"role": "user", "content": "x"},
                ]
            }
        ).encode(),
        400,
        "messages.0.content.0",
        "invalid_value",
    ),
    (
        "last message not user",
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        ).encode(),
        400,
        "messages",
        "invalid_value",
    ),
    ("body size", _chat("x" * 2_100_000), 413, None, "body_too_large"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "marker"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_are_refused_and_the_server_still_answers(
    server, client, name, body, status, param, marker
):
    got, payload = _raw(server[1], "/v1/chat/completions", body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert marker == error["code"] or marker in error["message"], error
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    _still_answers(client)


def test_remote_images_never_reach_private_addresses(server, client):
    engine, url = server
    engine.allow_remote_images = True
    try:
        for target in (
            f"{url}/health",
            "http://localhost/x.png",
            "http://169.254.169.254/latest",
            "http://10.1.2.3/a.png",
            "http://[::1]/a.png",
        ):
            status, payload = _raw(url, "/v1/chat/completions", _image_chat(target))
            assert status == 400 and payload["error"]["code"] == "remote_image_refused", (target, payload)
    finally:
        engine.allow_remote_images = False
    _still_answers(client)


def test_unknown_paths_and_methods_get_openai_errors(server):
    status, body = _get(server[1], "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, body = _get(server[1], "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(body)


def test_api_key(server):
    engine, _ = server
    batcher = Batcher(engine.run_batch, max_batch=4, window_s=0.0)
    try:
        with running(create_app(engine, batcher, api_key="s3cret")) as url:
            keyless = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError) as caught:
                _ask(keyless, [{"role": "user", "content": "hi"}], max_tokens=2)
            assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
            keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
            assert _ask(keyed, [{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens >= 1
    finally:
        batcher.close()


def test_full_queue_is_503_and_a_disconnect_frees_its_slot(server):
    engine, _ = server
    taken, release = threading.Event(), threading.Event()

    def blocked(jobs):  # the model thread holds its first batch until the test lets it go
        taken.set()
        release.wait(30)
        engine.run_batch(jobs)

    batcher = Batcher(blocked, max_batch=1, window_s=0.0, max_queue=1)
    body = _chat("hi", max_tokens=2)
    results = []
    try:
        with running(create_app(engine, batcher)) as url:
            first = threading.Thread(
                target=lambda: results.append(_raw(url, "/v1/chat/completions", body)[0])
            )
            first.start()
            _wait(taken.is_set)
            parts = urlsplit(url)
            leaving = socket.create_connection((parts.hostname, parts.port))
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            leaving.sendall(head.encode() + body)
            _wait(lambda: batcher.depth == 1)
            status, payload = _raw(url, "/v1/chat/completions", body)
            assert status == 503 and payload["error"]["code"] == "queue_full"
            leaving.close()  # the waiting client goes away: its slot is freed without running
            _wait(lambda: batcher.depth == 0)
            assert _raw(url, "/health", b"")[0] == 405  # the event loop still serves
            release.set()
            first.join(30)
            assert results == [200]
            assert _raw(url, "/v1/chat/completions", body)[0] == 200
    finally:
        release.set()
        batcher.close()


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
