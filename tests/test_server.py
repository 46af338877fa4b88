"""``mlx-qwenvl server`` as clients meet it (issue 18): the real ``openai`` client and raw HTTP
against a server subprocess on the demo model, answers equal to ``generate()``, OpenAI's wire
format, and every bad input of a table answered with its status and a one-line message, the
server answering a good request right after."""

import base64
import functools
import http.client
import http.server
import json
import os
import threading

import pytest

from server_support import (
    QUESTION,
    RED_CIRCLE,
    data_uri,
    image_question,
    inprocess_server,
    post,
    request,
    sse_events,
    subprocess_server,
)

import openai  # noqa: E402  (the test extra has it; a missing one must fail, not skip)

KEY = "test-key-18"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_CAP_MB = 4


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """--media-path with the red circle, and a symlink inside it that points outside."""
    root = tmp_path_factory.mktemp("media")
    (root / "media").mkdir()
    (root / "media" / "red.png").write_bytes(RED_CIRCLE.read_bytes())
    (root / "secret.png").write_bytes(RED_CIRCLE.read_bytes())
    os.symlink(root / "secret.png", root / "media" / "escape.png")
    return root


@pytest.fixture(scope="module")
def web(media):
    """A loopback web server for image URLs: red.png, a text file, and 404 for the rest."""
    site = media / "site"
    site.mkdir()
    (site / "red.png").write_bytes(RED_CIRCLE.read_bytes())
    (site / "notes.txt").write_text("not an image")
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(media):
    with subprocess_server("--model", "demo", "--api-key", KEY, "--media-path", media / "media",
                           "--max-body-mb", BODY_CAP_MB, "--max-tokens", 16) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def demo():
    from mlx_qwenvl import load

    return load("demo")


def messages(url=None):
    return image_question(url)["messages"]


def reference_messages():
    """The same conversation in the processor's own format, for ``generate()``."""
    return [{"role": "user", "content": [{"type": "image", "image": data_uri()}, {"type": "text", "text": QUESTION}]}]


def test_answers_equal_generate(client, demo):
    from mlx_qwenvl import generate

    model, processor = demo
    reference = generate(model, processor, reference_messages(), max_tokens=8, temperature=0.0)
    assert reference.text == "red"
    answer = client.chat.completions.create(model="demo", messages=messages(), max_tokens=8, temperature=0)
    choice = answer.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "red", "stop")
    assert answer.usage.prompt_tokens == reference.prompt_tokens
    assert answer.usage.completion_tokens == len(reference.tokens)
    assert answer.usage.total_tokens == reference.prompt_tokens + len(reference.tokens)
    assert answer.model == "demo" and answer.object == "chat.completion"

    chunks = list(client.chat.completions.create(model="demo", messages=messages(), max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_models(client, server):
    listed = client.models.list().data
    assert [(m.id, m.object) for m in listed] == [("demo", "model")]
    assert client.models.retrieve("demo").id == "demo"
    status, _, _ = request(server, "GET", "/v1/models/other", headers=AUTH)
    assert status == 404


def test_usage_chunk_only_with_include_usage(client):
    plain = list(client.chat.completions.create(model="demo", messages=messages(), stream=True))
    assert all(len(c.choices) == 1 and c.usage is None for c in plain)

    asked = list(client.chat.completions.create(model="demo", messages=messages(), stream=True,
                                                stream_options={"include_usage": True}))
    *chunks, last = asked
    assert last.choices == [] and last.usage.completion_tokens == 2
    assert last.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop(client, demo):
    from mlx_qwenvl import generate

    model, processor = demo
    reference = generate(model, processor, reference_messages(), max_tokens=8, temperature=0.0, stop=["d"])
    assert reference.text == "re"
    answer = client.chat.completions.create(model="demo", messages=messages(), stop=["d"], temperature=0)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("re", "stop")
    chunks = list(client.chat.completions.create(model="demo", messages=messages(), stop="d", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "re"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_length(client):
    answer = client.chat.completions.create(model="demo", messages=messages(), max_completion_tokens=1)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("red", "length")


def test_logprobs(client, demo):
    from mlx_qwenvl.generate import stream_generate

    model, processor = demo
    first = next(stream_generate(model, processor, reference_messages(), max_tokens=1, temperature=0.0))
    expected = first.logprobs[first.token].item()
    answer = client.chat.completions.create(model="demo", messages=messages(), logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["red"]  # the end-of-turn token is not text
    assert content[0].logprob == pytest.approx(expected, abs=1e-4)
    assert content[0].bytes == list(b"red")
    top = content[0].top_logprobs
    assert len(top) == 3 and top[0].token == "red"
    assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)

    chunks = list(client.chat.completions.create(model="demo", messages=messages(), logprobs=True, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == ["red"]
    plain = client.chat.completions.create(model="demo", messages=messages())
    assert plain.choices[0].logprobs is None


def test_wire_format(server):
    status, headers, data = request(server, "POST", "/v1/chat/completions",
                                    image_question(stream=True, stream_options={"include_usage": True}),
                                    headers=AUTH)
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream" and headers["Cache-Control"] == "no-cache"
    assert data.endswith(b"data: [DONE]\n\n")
    events, _ = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and set(usage["usage"]) == {
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert all(c["choices"][0]["index"] == 0 for c in chunks[:-1])

    status, headers, body = post(server, image_question(), headers=AUTH)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "red"}
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0


def test_cors_and_health(server):
    status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions",
                                 headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    status, _, data = request(server, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


def test_request_shapes(server, web, media):
    """Images as clients send them: each shape reaches the model (it answers red)."""
    raw = base64.b64encode(RED_CIRCLE.read_bytes()).decode()
    shapes = {
        "image_url object": {"type": "image_url", "image_url": {"url": data_uri(), "detail": "auto"}},
        "image_url string": {"type": "image_url", "image_url": data_uri()},
        "input_image": {"type": "input_image", "image_url": data_uri()},
        "data:image;base64": {"type": "image_url", "image_url": {"url": "data:image;base64," + raw}},
        "jpeg subtype": {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + raw}},
        "bare base64": {"type": "image_url", "image_url": {"url": raw}},
        "http URL": {"type": "image_url", "image_url": {"url": f"{web}/red.png"}},
        "local relative": {"type": "image_url", "image_url": {"url": "red.png"}},
        "local absolute": {"type": "image_url", "image_url": {"url": str(media / "media" / "red.png")}},
        "file URL": {"type": "image_url", "image_url": {"url": (media / "media" / "red.png").as_uri()}},
        "per-part pixels": {"type": "image_url", "image_url": {"url": data_uri()}, "max_pixels": 63504},
    }
    for name, part in shapes.items():
        body = {"model": "anything", "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
                "max_tokens": 8, "user": "someone", "metadata": {"a": 1}, "n": 1, "presence_penalty": 0}
        status, _, answer = post(server, body, headers=AUTH)
        assert status == 200, (name, answer)
        assert answer["choices"][0]["message"]["content"] == "red", name
        assert answer["model"] == "demo"  # one served model, whatever the request names


def test_text_only_and_roles(server, demo):
    """A text-only request whose 'developer' message is the system prompt (OpenAI's newer name)."""
    from mlx_qwenvl import generate

    body = {"messages": [{"role": "developer", "content": "Answer in one word."},
                         {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_tokens": 4, "temperature": 0}
    status, _, answer = post(server, body, headers=AUTH)
    reference = generate(*demo, [{"role": "system", "content": "Answer in one word."},
                                 {"role": "user", "content": "hello"}], max_tokens=4, temperature=0.0)
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == reference.text
    assert answer["usage"]["prompt_tokens"] == reference.prompt_tokens


def bad_inputs(web, media):
    """(name, request keyword arguments, status, a fragment of the message)."""
    def chat(**body):
        return {"body": {"messages": messages(), "max_tokens": 4, **body}}

    def image(url):
        return {"body": image_question(url)}

    return [
        ("malformed JSON", {"raw": b'{"messages": [', "body": None}, 400, "malformed JSON"),
        ("not an object", {"raw": b"[1, 2]", "body": None}, 400, "JSON object"),
        ("missing messages", {"body": {"model": "demo"}}, 400, "'messages' is required"),
        ("messages not a list", {"body": {"messages": "hi"}}, 400, "non-empty list"),
        ("empty messages", {"body": {"messages": []}}, 400, "non-empty list"),
        ("message not an object", {"body": {"messages": ["hi"]}}, 400, "must be an object"),
        ("unknown role", {"body": {"messages": [{"role": "robot", "content": "hi"}]}}, 400, "role"),
        ("content wrong type", {"body": {"messages": [{"role": "user", "content": 5}]}}, 400, "content"),
        ("max_tokens wrong type", chat(max_tokens="ten"), 400, "'max_tokens' must be an integer"),
        ("max_tokens zero", chat(max_tokens=0), 400, "'max_tokens' must be at least 1"),
        ("temperature wrong type", chat(temperature="hot"), 400, "'temperature' must be a number"),
        ("negative temperature", chat(temperature=-1), 400, "temperature"),
        ("top_p out of range", chat(top_p=2), 400, "top_p"),
        ("stream wrong type", chat(stream="yes"), 400, "'stream' must be true or false"),
        ("seed not whole", chat(seed=1.5), 400, "'seed' must be an integer"),
        ("seed negative", chat(seed=-1), 400, "seed"),
        ("stop wrong type", chat(stop=[1]), 400, "'stop'"),
        ("top_logprobs without logprobs", chat(top_logprobs=2), 400, "logprobs"),
        ("unknown part type", {"body": {"messages": [{"role": "user", "content": [
            {"type": "audio", "audio": "x"}]}]}}, 400, "unknown content part type 'audio'"),
        ("text part without text", {"body": {"messages": [{"role": "user", "content": [
            {"type": "text"}]}]}}, 400, "text"),
        ("undecodable image", image("data:image/png;base64," + base64.b64encode(b"hello world").decode()),
         400, "not a recognized image"),
        ("data URI not an image", image("data:text/plain;base64,aGVsbG8="), 400, "not an image"),
        ("URL that 404s", image(f"{web}/missing.png"), 400, "HTTP 404"),
        ("URL that is not an image", image(f"{web}/notes.txt"), 400, "not an image"),
        ("path outside --media-path", image("/etc/hostname"), 400, "outside"),
        ("path with ..", image("../secret.png"), 400, "'..'"),
        ("symlink out of --media-path", image("escape.png"), 400, "outside"),
        ("file URL outside", image("file:///etc/hostname"), 400, "outside"),
        ("missing local file", image("nothere.png"), 400, "no file"),
        ("min_pixels over max_pixels", chat(min_pixels=100000, max_pixels=50000), 400, "min_pixels"),
        ("body over the cap", {"body": None, "raw": b"{}",
                               "headers": {"Content-Length": str(BODY_CAP_MB * 2**20 + 1)}}, 413, "limit"),
        ("body over the cap, asking first", {"body": None, "raw": b"{}", "headers": {
            "Content-Length": str(BODY_CAP_MB * 2**20 + 1), "Expect": "100-continue"}}, 413, "limit"),
        ("prompt over the context", chat(messages=[{"role": "user", "content": "word " * 5000}]), 400, "context"),
        ("wrong API key", {"body": image_question(), "headers": {"Authorization": "Bearer wrong"}}, 401, "API key"),
        ("no API key", {"body": image_question(), "headers": {"Authorization": ""}}, 401, "API key"),
        ("n=2", chat(n=2), 400, "n=2 is not supported"),
        ("tools", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400,
         "not supported"),
        ("response_format", chat(response_format={"type": "json_object"}), 400, "response_format"),
        ("frequency_penalty", chat(frequency_penalty=0.5), 400, "not supported"),
    ]


def test_bad_inputs(server, web, media):
    for name, call, status, fragment in bad_inputs(web, media):
        headers = {**AUTH, **call.get("headers", {})}
        if "raw" in call and "Content-Length" in call.get("headers", {}):
            got, body = send_headers_only(server, headers)
        else:
            got, _, body = request(server, "POST", "/v1/chat/completions", call["body"], headers,
                                   raw=call.get("raw"), timeout=30)
        error = json.loads(body)["error"]
        assert got == status, (name, error)
        assert fragment in error["message"], (name, error["message"])
        assert "\n" not in error["message"] and len(error["message"]) < 400, name
        assert set(error) == {"message", "type", "param", "code"}, name
    status, _, answer = post(server, image_question(), headers=AUTH)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "red"


def send_headers_only(server, headers) -> tuple:
    """A POST whose headers announce a body that never comes: a server that read it first
    would wait for it until the socket timeout; one that refuses by its length answers now
    (and answers a client that asks first, with Expect: 100-continue, with the refusal rather
    than "go on")."""
    import socket

    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        length = 0
        while (line := reader.readline().strip()):
            name, _, value = line.decode().partition(":")
            length = int(value) if name.lower() == "content-length" else length
        body = reader.read(length)
        reader.close()
    return status, body


def test_unknown_paths(server):
    status, _, body = request(server, "GET", "/v1/nothing", headers=AUTH)
    assert status == 404 and "no endpoint" in json.loads(body)["error"]["message"]
    status, _, _ = request(server, "GET", "/v1/chat/completions", headers=AUTH)
    assert status == 405
    status, _, _ = request(server, "GET", "/v1/models")  # no key
    assert status == 401


def test_logprobs_of_a_bfloat16_model():
    """Checkpoints are bfloat16 and stay so on Metal: the log-probabilities (in the logits'
    dtype) must reach the client (NumPy cannot convert bfloat16 arrays)."""
    from mlx_qwenvl import load, stream_generate

    model, processor = load("demo", dtype="bfloat16")
    head = next(stream_generate(model, processor, reference_messages(), max_tokens=1, temperature=0.0))
    with inprocess_server(model, processor) as running:
        status, _, answer = post(running, image_question(logprobs=True, top_logprobs=3, max_tokens=1))
    assert status == 200, answer
    first = answer["choices"][0]["logprobs"]["content"][0]
    assert first["logprob"] == pytest.approx(head.logprobs[head.token].item(), abs=1e-6)
    values = [entry["logprob"] for entry in first["top_logprobs"]]
    assert values == sorted(values, reverse=True) and values[0] == first["logprob"]


def test_head_gives_get_headers_without_a_body(server):
    """curl -I, link checkers and probes: HEAD answers as GET, without the body, and the
    keep-alive connection stays usable."""
    get_status, get_headers, page = request(server, "GET", "/")
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        for path, status in (("/", 200), ("/health", 200), ("/v1/models", 401)):
            connection.request("HEAD", path)
            response = connection.getresponse()
            assert response.status == status and response.read() == b"", path
            if path == "/":
                assert get_status == 200 and len(page) > 0
                assert response.getheader("Content-Length") == get_headers["Content-Length"]
                assert response.getheader("Content-Security-Policy") == get_headers["Content-Security-Policy"]
        connection.request("GET", "/health")
        assert json.loads(connection.getresponse().read())["status"] == "ok"
    finally:
        connection.close()


def test_openai_client_sees_error_messages(client):
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.chat.completions.create(model="demo", messages=messages(), n=2)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_command_is_listed():
    from click.testing import CliRunner

    from mlx_qwenvl.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert "server" in result.output
    result = CliRunner().invoke(main, ["server", "--help"])
    for flag in ("--host", "--port", "--api-key", "--allowed-origins", "--served-model-name", "--max-pixels",
                 "--min-pixels", "--max-tokens", "--kv-bits", "--max-queue", "--media-path", "--no-remote-images",
                 "--prompt-cache-size", "--prompt-cache-bytes"):
        assert flag in result.output, flag
    assert "127.0.0.1" in result.output


def test_media_policy_without_remote_or_local(web):
    """--no-remote-images never connects; without --media-path no path is read at all."""
    from mlx_qwenvl.server_requests import APIError, MediaPolicy

    hits = []
    original = QuietHandler.do_GET
    QuietHandler.do_GET = lambda self: (hits.append(self.path), original(self))[1]
    try:
        policy = MediaPolicy(media_path=None, allow_remote=False)
        with pytest.raises(APIError, match="disabled"):
            policy.image(f"{web}/red.png", "image")
        with pytest.raises(APIError, match="not allowed"):
            policy.image(str(RED_CIRCLE), "image")
        assert hits == []
        assert MediaPolicy(allow_remote=True).image(f"{web}/red.png", "image").size == (246, 269)
        assert hits == ["/red.png"]
    finally:
        QuietHandler.do_GET = original


def test_parse_size():
    from mlx_qwenvl.server import parse_size

    assert parse_size("4GiB") == 4 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")

