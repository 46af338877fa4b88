"""The server stays up (issue 18): a client that disconnects stops its generation at the next
token, a failing request (out of memory on an image) answers that request and leaves the
server serving, a dead worker answers 503 instead of leaving streams hanging, and SSE comment
lines flow while a slow prefill runs. Servers run in this process on 127.0.0.1."""

import json
import socket
import time

import mlx.core as mx
import pytest

from mlx_qwenvl.loading import load
from mlx_qwenvl.vision import VisionModel
from server_support import image_question, inprocess_server, post, request, sse_events, stream_text, wait_for

LONG = 150  # tokens a long answer may take (the random tiny model rarely ends on its own)


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir, dtype=mx.float32)


def long_request(**body) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": LONG,
            "temperature": 0, **body}


def open_stream(server, body: dict):
    """A request on a raw socket whose response is read line by line (``hang_up`` ends it)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    response = sock.makefile("rb")
    assert response.readline().split()[1] == b"200"
    return sock, response


def read_content_chunks(response, count: int) -> list:
    chunks = []
    while len(chunks) < count:
        line = response.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: {") and b'"content"' in line and b'"role"' not in line:
            chunks.append(json.loads(line[6:]))
    return chunks


def hang_up(sock, response=None) -> None:
    """Close the client's socket at once (a reset rather than a polite close); the file
    reading it holds the descriptor open too."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    if response is not None:
        response.close()
    sock.close()


def test_disconnect_stops_generation_at_the_next_token(tiny):
    """The uninterrupted answer runs to max_tokens; a client that reads a few chunks and goes
    makes the worker stop within a few tokens, and the server answers the next request."""
    model, processor = tiny
    with inprocess_server(model, processor, keepalive_s=0.05) as server:
        status, _, full = post(server, long_request())
        assert status == 200 and full["usage"]["completion_tokens"] == LONG  # it would run on
        sock, response = open_stream(server, long_request(stream=True))
        seen = len(read_content_chunks(response, 3))
        hang_up(sock, response)
        worker = server.app.worker
        assert wait_for(lambda: worker.last_job.outcome == "cancelled", timeout=30)
        stopped_at = worker.last_job.generated
        assert stopped_at < LONG // 2, stopped_at
        assert seen <= stopped_at
        status, _, answer = post(server, long_request(max_tokens=5))
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
        assert worker.stats["cancelled"] == 1


def test_disconnect_of_a_waiting_non_streaming_request(tiny):
    """A non-streaming client that leaves is noticed while it waits (no write to fail)."""
    model, processor = tiny
    with inprocess_server(model, processor, keepalive_s=0.05) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        data = json.dumps(long_request(max_tokens=4000)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        worker = server.app.worker
        assert wait_for(lambda: worker.last_job is not None and worker.last_job.generated > 2, timeout=30)
        hang_up(sock)
        at_hang_up = worker.last_job.generated
        assert wait_for(lambda: worker.last_job.outcome == "cancelled", timeout=30)
        assert worker.last_job.generated < at_hang_up + 100  # noticed within an interval or so


@pytest.fixture
def failing_vision(monkeypatch):
    """The vision tower runs out of memory while ``state['fail']`` is set."""
    state = {"fail": False}
    original = VisionModel.__call__

    def vision(self, *args, **kwargs):
        if state["fail"]:
            raise RuntimeError("[malloc] Unable to allocate 68719476736 bytes.")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionModel, "__call__", vision)
    return state


def test_a_failing_request_leaves_the_server_serving(demo, failing_vision):
    model, processor = demo
    with inprocess_server(model, processor) as server:
        failing_vision["fail"] = True
        status, _, body = post(server, image_question())
        assert status == 500 and "out of memory" in body["error"]["message"]
        status, _, data = post(server, image_question(stream=True))
        events, _ = sse_events(data)
        assert status == 200 and "out of memory" in events[-1]["error"]["message"]
        assert "[DONE]" not in events  # the error event, then the end of the stream
        failing_vision["fail"] = False
        status, _, body = post(server, image_question())
        assert status == 200 and body["choices"][0]["message"]["content"] == "red"
        status, _, health = request(server, "GET", "/health")
        assert status == 200 and json.loads(health)["stats"]["failed"] == 2


class WorkerKilled(BaseException):
    """Not an Exception: what a per-request handler does not catch (as a C-level abort)."""


def test_a_dead_worker_answers_503(demo, monkeypatch):
    """Requests waiting when the worker dies get an error instead of hanging; /health and new
    requests say 503."""
    model, processor = demo
    with inprocess_server(model, processor, keepalive_s=0.05) as server:
        worker = server.app.worker
        monkeypatch.setattr(worker, "_serve", lambda job: (_ for _ in ()).throw(WorkerKilled()))
        tic = time.monotonic()
        status, _, body = post(server, image_question(), timeout=20)
        assert status == 503 and time.monotonic() - tic < 15
        assert "worker" in body["error"]["message"]
        assert wait_for(lambda: not worker.alive, timeout=10)
        status, _, health = request(server, "GET", "/health")
        assert status == 503 and json.loads(health)["status"] == "unavailable"
        status, _, body = post(server, image_question(stream=True))
        assert status == 503 and body["error"]["code"] == "worker_dead"


def test_comments_flow_during_a_slow_prefill(demo, monkeypatch):
    """While the image is encoded (no progress to report) the stream carries SSE comment
    lines, and only comments: the answer is unchanged."""
    model, processor = demo
    original = VisionModel.__call__

    def slow(self, *args, **kwargs):
        time.sleep(0.6)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionModel, "__call__", slow)
    with inprocess_server(model, processor, keepalive_s=0.1) as server:
        status, _, data = post(server, image_question(stream=True))
    events, comments = sse_events(data)
    assert status == 200 and stream_text(events) == "red"
    assert sum(comment == ": keepalive" for comment in comments) >= 3
    text = data.decode()
    assert text.index(": keepalive") < text.index('"content": "red"')


def test_queue_bound(demo, monkeypatch):
    """With --max-queue 1, a request arriving while one runs and one waits gets 503 at once;
    both others are answered."""
    import threading

    model, processor = demo
    original, gate = VisionModel.__call__, threading.Event()

    def held(self, *args, **kwargs):
        gate.wait(30)  # the running request stays in its vision tower until the test lets go
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionModel, "__call__", held)
    with inprocess_server(model, processor, max_queue=1, prompt_cache_size=0) as server:
        worker, results = server.app.worker, []
        threads = [threading.Thread(target=lambda: results.append(post(server, image_question())[0]))
                   for _ in range(2)]
        try:
            threads[0].start()  # runs (held in the vision tower)
            assert wait_for(lambda: worker.last_job is not None and worker.last_job.outcome == "running", timeout=30)
            threads[1].start()  # waits
            assert wait_for(lambda: worker.waiting == 1, timeout=30)
            tic = time.monotonic()
            status, _, body = post(server, image_question())
            assert status == 503 and body["error"]["code"] == "server_busy" and time.monotonic() - tic < 5
        finally:
            gate.set()
            for thread in threads:
                thread.join(30)
        assert sorted(results) == [200, 200]
