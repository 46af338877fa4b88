"""The server under load (issue 18), bounded and on loopback only: 8 concurrent streaming
clients x 5 requests against a server subprocess on the demo model with a short queue, some
clients hanging up mid-stream. Every completed answer is right, every other request is a
disconnect or a 503 from the full queue, the server's memory after the last round is within
10% of its level after the first, and /health answers 200 throughout."""

import json
import socket
import sys
import threading
import time

import pytest

from server_support import image_question, request, sse_events, stream_text, subprocess_server, wait_for

CLIENTS = 8
REQUESTS = 5
REQUEST_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the memory")


def one_request(server, hang_up: bool) -> tuple:
    """``("ok", text)``, ``("busy", error)`` or ``("gone", None)`` for one streaming request;
    ``hang_up`` closes the connection as soon as the stream has started."""
    body = json.dumps(image_question(stream=True, stream_options={"include_usage": True})).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S)
    reader = sock.makefile("rb")
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        status = int(reader.readline().split()[1])
        if status == 503:
            headers = read_headers(reader)
            return "busy", json.loads(reader.read(int(headers["content-length"])))["error"]
        assert status == 200, status
        read_headers(reader)
        if hang_up:
            assert reader.readline().startswith(b"data: ")  # the role chunk: the stream has begun
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return "gone", None
        events, _ = sse_events(reader.read())
        assert events[-1] == "[DONE]" and events[-3]["choices"][0]["finish_reason"] == "stop"
        assert events[-2]["choices"] == []
        return "ok", stream_text(events)
    finally:
        reader.close()
        sock.close()


def read_headers(reader) -> dict:
    headers = {}
    while (line := reader.readline().strip()):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


class HealthWatch(threading.Thread):
    """Polls /health every 0.2 s and keeps every status seen."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.statuses, self.done = server, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            self.statuses.append(request(self.server, "GET", "/health", timeout=10)[0])
            self.done.wait(0.2)


def idle(server) -> bool:
    status, _, data = request(server, "GET", "/health")
    body = json.loads(data)
    return status == 200 and body["waiting"] == 0 and (body["last_request"] or {}).get("outcome") != "running"


@pytest.mark.slow
def test_concurrent_streaming_clients():
    with subprocess_server("--model", "demo", "--max-queue", "2") as server:
        watch = HealthWatch(server)
        watch.start()
        results, rss = [], []
        try:
            for round_ in range(REQUESTS):
                outcomes = [None] * CLIENTS

                def client(i, round_=round_, outcomes=outcomes):
                    hang_up = (i + round_) % 4 == 0
                    outcomes[i] = (hang_up, *one_request(server, hang_up))

                threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
                tic = time.monotonic()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(REQUEST_TIMEOUT_S)
                assert not any(thread.is_alive() for thread in threads), "a client hung"
                assert time.monotonic() - tic < REQUEST_TIMEOUT_S
                assert wait_for(lambda: idle(server), timeout=30)
                rss.append(server.rss_kib())
                results += outcomes
        finally:  # the watcher stops even when a round fails
            watch.done.set()
            watch.join(15)
        stats = json.loads(request(server, "GET", "/health")[2])["stats"]

    assert len(results) == CLIENTS * REQUESTS and None not in results
    for hang_up, kind, detail in results:
        assert kind in (("gone", "busy") if hang_up else ("ok", "busy")), (hang_up, kind, detail)
        assert kind != "ok" or detail == "red"
        assert kind != "busy" or detail["code"] == "server_busy"
    kinds = [kind for _, kind, _ in results]
    assert kinds.count("ok") >= REQUESTS and kinds.count("gone") > 0  # at least one answer a round
    assert kinds.count("busy") > 0, "the queue never filled: the test did not load the server"
    assert stats["completed"] + stats["cancelled"] == kinds.count("ok") + kinds.count("gone")
    assert max(rss[1:]) <= rss[0] * 1.10, rss
    assert watch.statuses and set(watch.statuses) == {200}
