"""The answer of a chat request, from the worker's events: one ``chat.completion`` object, or
server-sent events in OpenAI's wire format (the role chunk first, content chunks, the final
chunk with its ``finish_reason``, the usage chunk only when asked for, ``data: [DONE]``; SSE
comment lines while nothing else is sent; an error after the start as one error event, then
the end). Runs on the request's HTTP thread.
"""

from __future__ import annotations

import json
import queue
import time
import uuid

from .server_requests import dead


class TokenText:
    """Token ids to OpenAI logprob entries: the token's text and its raw bytes (byte-level BPE
    pieces can be parts of one UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
        self._memo: dict = {}

    def bytes(self, token: int) -> bytes:
        if token not in self._memo:
            piece = self.tokenizer.convert_ids_to_tokens(int(token))
            if all(char in self.byte_of for char in piece):
                self._memo[token] = bytes(self.byte_of[char] for char in piece)
            else:  # a special or added token: its text as is
                self._memo[token] = piece.encode("utf-8")
        return self._memo[token]

    def entry(self, token: int, logprob: float) -> dict:
        raw = self.bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class Reply:
    """Waits on a job's events for the HTTP side; ``outcome`` says how it ended (for the log)."""

    def __init__(self, handler, job, request):
        self.handler, self.job, self.request = handler, job, request
        self.app = handler.app
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = self.app.settings.served_model_name
        self.outcome = "started"

    def events(self):
        """The job's events, ``("keepalive",)`` after each quiet interval. At least once an
        interval (tokens may never leave the queue quiet), a dead worker becomes an error
        event and a client that has gone ends the iteration."""
        interval = self.app.settings.keepalive_s
        checked = time.monotonic()
        while True:
            try:
                event = self.job.events.get(timeout=interval)
            except queue.Empty:
                event = None
            if event is None or time.monotonic() - checked >= interval:
                checked = time.monotonic()
                if event is None and not self.app.worker.alive and self.job.events.empty():
                    event = ("error", dead())
                elif self.handler.client_gone():
                    self.outcome = "client gone"
                    return
            yield event or ("keepalive",)
            if event is not None and event[0] in ("done", "error"):
                return

    def usage(self, usage: dict) -> dict:
        return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}

    def logprob_entry(self, token) -> dict:
        entry = self.app.token_text.entry(token.token, token.logprob)
        entry["top_logprobs"] = [self.app.token_text.entry(t, lp) for t, lp in token.top]
        return entry


class Completion(Reply):
    """A non-streaming answer: one ``chat.completion`` object, sent when the answer is done."""

    def run(self) -> None:
        text, logprobs = [], []
        for event in self.events():
            if event[0] == "token":
                token = event[1]
                text.append(token.text)
                if self.request.logprobs and not token.eos:
                    logprobs.append(self.logprob_entry(token))
            elif event[0] == "error":
                self.outcome = f"error {event[1].status}"
                return self.handler._error(event[1])
            elif event[0] == "done":
                self.outcome = "done"
                return self._send("".join(text), logprobs, event[1], event[2])

    def _send(self, text: str, logprobs: list, finish: str, usage: dict) -> None:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": logprobs} if self.request.logprobs else None,
                  "finish_reason": finish}
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(usage)}
        try:
            self.handler._json(200, body)
        except OSError:
            self.outcome = "client gone"


class Stream(Reply):
    """Server-sent events: the role chunk, content chunks, the final chunk with its
    ``finish_reason``, the usage chunk only when asked for, ``data: [DONE]``; SSE comments
    while the prompt is prefilled; an error after the start is one error event, then the end."""

    def run(self) -> None:
        handler = self.handler
        handler.close_connection = True  # no Content-Length: the body ends with the connection
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Cache-Control", "no-cache")
            handler.send_header("Connection", "close")
            handler.send_header("X-Accel-Buffering", "no")  # proxies: pass events on at once
            handler._cors()
            handler.end_headers()
            self.send(self.chunk({"role": "assistant", "content": ""}))
            for event in self.events():
                self.handle(event)
        except OSError:  # BrokenPipe, ConnectionReset, a write timeout: the client has gone
            self.outcome = "client gone"

    def handle(self, event) -> None:
        kind = event[0]
        if kind == "keepalive":
            self.write(b": keepalive\n\n")
        elif kind == "progress":
            self.write(f": prefill {event[1]}/{event[2]}\n\n".encode())
        elif kind == "token":
            self.token(event[1])
        elif kind == "error":
            self.outcome = f"error {event[1].status}"
            self.send(event[1].body())
        elif kind == "done":
            self.finish(event[1], event[2])

    def token(self, token) -> None:
        # A write into a connection the client has reset can still succeed: ask the socket.
        if self.handler.client_gone():
            raise BrokenPipeError("client gone")
        if token.eos and not token.text:
            return
        if not token.text and not self.request.logprobs:
            return  # text held back (a possible stop string): nothing to say yet
        logprobs = {"content": [self.logprob_entry(token)]} if self.request.logprobs else None
        self.send(self.chunk({"content": token.text}, logprobs=logprobs))

    def finish(self, reason: str, usage: dict) -> None:
        self.send(self.chunk({}, finish_reason=reason))
        if self.request.include_usage:
            self.send({**self.base(), "choices": [], "usage": self.usage(usage)})
        self.write(b"data: [DONE]\n\n")
        self.outcome = "done"

    def base(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def chunk(self, delta: dict, finish_reason=None, logprobs=None) -> dict:
        body = {**self.base(), "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish_reason}]}
        if self.request.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the usage chunk
        return body

    def send(self, body: dict) -> None:
        self.write(b"data: " + json.dumps(body).encode() + b"\n\n")

    def write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        self.handler.wfile.flush()
