"""Helpers for the server tests: a server in a subprocess or in this process, raw HTTP on
loopback, server-sent events, images as data URIs. Every wait is bounded."""

import base64
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RED_CIRCLE = ROOT / "examples" / "images" / "red_circle.png"
QUESTION = "What color is the circle?"
START_TIMEOUT_S = 120
HTTP_TIMEOUT_S = 60


def data_uri(path: Path = RED_CIRCLE, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_question(url=None, text: str = QUESTION, **body) -> dict:
    """A chat request asking ``text`` about one image (the red circle by default)."""
    part = {"type": "image_url", "image_url": {"url": url or data_uri()}}
    return {"model": "demo", "messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}],
            "max_tokens": 8, "temperature": 0.0, **body}


class Subprocess:
    """``python -m mlx_qwenvl server ... --port 0`` with its URL read from its start line;
    stderr is drained in a thread (kept in ``log``) so the pipe never fills."""

    def __init__(self, *args, env=None):
        command = [sys.executable, "-m", "mlx_qwenvl", "server", "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)
        self.log, self.url = [], None
        self._started = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._started.wait(START_TIMEOUT_S) or self.url is None:
            self.close()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        self.host, self.port = re.match(r"http://([^:/]+):(\d+)", self.url).groups()
        self.port = int(self.port)

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"at (http://\S+)/v1", line)
            if found and self.url is None:
                self.url = found.group(1)
                self._started.set()
        self._started.set()  # the process ended

    def rss_kib(self) -> int:
        """The server's resident memory (Linux)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def subprocess_server(*args, env=None):
    server = Subprocess(*args, env=env)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def inprocess_server(model, processor, **settings):
    """The server on 127.0.0.1 with a free port, in this process (its app is inspectable)."""
    from mlx_qwenvl.server import ServerSettings, start_server

    running = start_server(model, processor, ServerSettings(host="127.0.0.1", port=0, **settings))
    running.host = "127.0.0.1"
    try:
        yield running
    finally:
        running.close()


def request(server, method: str, path: str, body=None, headers=None, raw: bytes = None,
            timeout: float = HTTP_TIMEOUT_S):
    """``(status, headers, body bytes)`` of one request on a fresh connection."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post(server, body, headers=None, **kwargs):
    status, response_headers, data = request(server, "POST", "/v1/chat/completions", body, headers, **kwargs)
    return status, response_headers, json.loads(data) if data.strip().startswith(b"{") else data


def sse_events(data: bytes) -> tuple[list, list]:
    """``(events, comments)`` of an SSE body: each ``data:`` payload (JSON, or the string
    '[DONE]') and each comment line."""
    events, comments = [], []
    for block in data.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events, comments


def stream_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
