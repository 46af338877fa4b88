"""``mlx-qwenvl server``: an OpenAI-compatible chat server that remembers conversations.

The design of ``mlx_lm.server``: Python's ``ThreadingHTTPServer`` (no dependency beyond the
standard library), one thread per request, and one worker thread (``server_worker``) that owns
the model and every MLX call. Request threads parse and validate the request, decode its
images under the media policy and encode the prompt (``server_requests``), queue the job, then
write the worker's events to the client as a JSON response or server-sent events in OpenAI's
wire format. The worker continues the cached conversation that shares the longest prefix with
the prompt (``server_cache``), so a client resending the whole history prefills only what is
new and never has an earlier image encoded again.

Endpoints: ``POST /v1/chat/completions`` (and ``/chat/completions``), ``GET /v1/models``,
``GET /health`` (503 once the worker has died), CORS preflight (``OPTIONS``), and ``GET /``: a
chat page for the browser (``web/chat.html`` with ``chat.css`` and ``chat.js``, served from
this origin only, under a content security policy that lets it load nothing else and talk
only to this server). The page itself needs no key; it asks for one when the API answers 401.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import click

from .cli import DTYPES, friendly_errors, load_for_cli
from .server_replies import Completion, Stream, TokenText
from .server_requests import APIError, MediaPolicy, parse_chat_request

log = logging.getLogger("mlx_qwenvl.server")

WEB = Path(__file__).parent / "web"
# The chat page and its files: URL path -> (file, content type).
PAGE_FILES = {"": ("chat.html", "text/html; charset=utf-8"),
              "/chat.css": ("chat.css", "text/css; charset=utf-8"),
              "/chat.js": ("chat.js", "text/javascript; charset=utf-8")}
# Only this server: its own script, styles and API; images from data: and blob: URLs (the
# pictures the user attaches); no inline script or style, no frames, no other origin.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
KEEPALIVE_S = 2.0  # an SSE comment line at least this often while nothing else is sent
READ_TIMEOUT_S = 60  # a client this long silent while sending its request is dropped


@dataclass
class ServerSettings:
    """Everything the command-line flags set (sizes in bytes)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    allowed_origins: tuple = ("*",)
    served_model_name: str = "model"
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_tokens: int = 512
    kv_bits: Optional[int] = None
    kv_group_size: Optional[int] = None  # None: 64, or the largest size dividing the head size
    quantized_kv_start: int = 5000
    prefill_step_size: int = 2048
    max_queue: int = 16
    media_path: Optional[str] = None
    allow_remote: bool = True
    prompt_cache_size: int = 10
    prompt_cache_bytes: int = 4 << 30
    max_body_bytes: int = 128 << 20
    keepalive_s: float = KEEPALIVE_S


class App:
    """The state the request threads share: settings, the prompt builder and the worker."""

    def __init__(self, model, processor, settings: ServerSettings):
        from .server_cache import ConversationCache  # noqa: PLC0415 (imports MLX)
        from .server_prompts import PromptBuilder  # noqa: PLC0415
        from .server_worker import Worker, WorkerOptions  # noqa: PLC0415

        self.settings = settings
        self.processor = processor
        self.created = int(time.time())
        policy = MediaPolicy(Path(settings.media_path) if settings.media_path else None,
                             settings.allow_remote)
        self.builder = PromptBuilder(processor, model.args, policy, settings.min_pixels,
                                     settings.max_pixels)
        cache = ConversationCache(settings.prompt_cache_size, settings.prompt_cache_bytes)
        self.worker = Worker(model, processor, cache, WorkerOptions(
            settings.kv_bits, settings.kv_group_size, settings.quantized_kv_start,
            settings.prefill_step_size, settings.max_queue))
        self.token_text = TokenText(processor.tokenizer)

    def health(self) -> tuple[int, dict]:
        alive = self.worker.alive
        body = {"status": "ok" if alive else "unavailable", "model": self.settings.served_model_name,
                "waiting": self.worker.waiting, "stats": dict(self.worker.stats),
                "prompt_cache": {"entries": len(self.worker.cache), "bytes": self.worker.cache.nbytes},
                "last_request": self.worker.last_job.summary() if self.worker.last_job else None}
        return (200 if alive else 503), body

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.settings.served_model_name, "object": "model", "created": self.created,
                "owned_by": "mlx-qwenvl"}

    def page_file(self, path: str) -> tuple[bytes, str]:
        """The chat page's file at a URL path, as ``(body, content type)``. The page is given
        what it must know of this server: the model's name, the image budget (so it shrinks
        only pictures the server would shrink, to the server's own size) and the answer length."""
        name, kind = PAGE_FILES[path]
        data = (WEB / name).read_bytes()
        if name == "chat.html":
            config = self.processor.config
            values = {"%MODEL%": html.escape(self.settings.served_model_name),
                      "%MAX_PIXELS%": str(self.settings.max_pixels or config.max_pixels),
                      "%MIN_PIXELS%": str(self.settings.min_pixels or config.min_pixels),
                      "%FACTOR%": str(config.patch_size * config.merge_size),
                      "%MAX_TOKENS%": str(self.settings.max_tokens)}
            text = data.decode()
            for marker, value in values.items():
                text = text.replace(marker, value)
            data = text.encode()
        return data, kind


# --------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; ``app`` is set on a subclass per server."""

    app: App
    protocol_version = "HTTP/1.1"
    server_version = "mlx-qwenvl"
    timeout = READ_TIMEOUT_S

    # ---- routing

    def do_OPTIONS(self):
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path == "/health":
                status, body = self.app.health()
                return self._json(status, body)
            if path in PAGE_FILES:  # the chat page holds nothing secret: it asks for the key
                return self._page(path)
            self._authorize()
            if path in ("/v1/models", "/models"):
                return self._json(200, self.app.models())
            if path.startswith(("/v1/models/", "/models/")):
                name = path.split("/models/", 1)[1]
                if name == self.app.settings.served_model_name:
                    return self._json(200, self.app.model_card())
                raise APIError(404, f"model {name!r} is not served here (this server serves "
                                    f"{self.app.settings.served_model_name!r})", "model", "model_not_found")
            raise self._not_found(path, "GET")
        except APIError as error:
            self._error(error)

    def do_HEAD(self):
        """GET's status and headers without the body (curl -I, link checkers, uptime probes)."""
        self.do_GET()

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        started = time.perf_counter()
        self.body_read = False
        try:
            self._authorize()
            if path not in ("/v1/chat/completions", "/chat/completions"):
                raise self._not_found(path, "POST")
            request = parse_chat_request(self._read_json(), self.app.settings.max_tokens)
            prompt = self.app.builder.build(request, self.app.worker.cache.peek)
            job = self._job(request, prompt)
            self.app.worker.submit(job)
        except Exception as error:  # noqa: BLE001 - a request's failure must not end its thread silently
            if not self.body_read:  # refused unread (401, 404): the body must not be taken as the next request
                self.close_connection = True
            if not isinstance(error, APIError):
                log.exception("request failed")
                error = APIError(500, f"{type(error).__name__}: {error}")
            return self._error(error)
        reply = Stream(self, job, request) if request.stream else Completion(self, job, request)
        try:
            reply.run()
        finally:
            job.cancelled.set()  # whatever happened, the worker need not go on for this client
            log.info("POST %s %s %.2fs", path, reply.outcome, time.perf_counter() - started)

    def _job(self, request, prompt):
        from .server_worker import Job  # noqa: PLC0415

        return Job(prompt, request.generation, request.logprobs, request.top_logprobs)

    def _not_found(self, path: str, method: str) -> APIError:
        known = {"/v1/chat/completions", "/chat/completions", "/v1/models", "/models", "/health", *PAGE_FILES}
        if path in known:
            return APIError(405, f"{method} is not allowed on {path or '/'}", code="method_not_allowed")
        return APIError(404, f"no endpoint {path!r} (try POST /v1/chat/completions, GET /v1/models, "
                             "or open / in a browser for the chat page)", code="not_found")

    # ---- requests

    def _authorize(self) -> None:
        """Bearer key, compared in constant time; nothing to check when the server has none."""
        key = self.app.settings.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send the header 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def _read_json(self):
        """The body as JSON, refused before reading when it is larger than the cap.

        Raises:
            APIError: 411 without a Content-Length, 413 over the cap, 400 for malformed JSON.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported; send a Content-Length",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise APIError(411, "a request body with a Content-Length is required", code="length_required")
        length = int(length)
        if length > self.app.settings.max_body_bytes:
            self.close_connection = True  # the unread body must not be taken as the next request
            raise self._too_large(length)
        raw = self.rfile.read(length)
        self.body_read = True
        try:
            return json.loads(raw)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise APIError(400, f"malformed JSON in the request body: {error}", code="invalid_json") from None

    def _too_large(self, length: int) -> APIError:
        return APIError(413, f"the request body is {length} bytes, over this server's limit of "
                             f"{self.app.settings.max_body_bytes} bytes (--max-body-mb)", code="request_too_large")

    def handle_expect_100(self) -> bool:
        """A client that asks before sending its body (curl does for large ones) is refused
        at once when the body would be over the cap, instead of told to go on."""
        length = self.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > self.app.settings.max_body_bytes:
            self.close_connection = True
            self._error(self._too_large(int(length)))
            return False
        return super().handle_expect_100()

    # ---- responses

    def _cors(self) -> None:
        origins = self.app.settings.allowed_origins
        origin = self.headers.get("Origin")
        if "*" in origins:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        requested = self.headers.get("Access-Control-Request-Headers")
        self.send_header("Access-Control-Allow-Headers", requested or "Authorization, Content-Type")

    def _json(self, status: int, body: dict, headers: dict = ()) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in dict(headers).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self._body(data)

    def _body(self, data: bytes) -> None:
        if self.command != "HEAD":
            self.wfile.write(data)

    def _page(self, path: str) -> None:
        data, kind = self.app.page_file(path)
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", PAGE_CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._body(data)

    def _error(self, error: APIError) -> None:
        if error.status >= 500:
            log.warning("%s %s: %d %s", self.command, self.path, error.status, error)
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        try:
            self._json(error.status, error.body(), headers)
        except OSError:
            pass  # the client has gone

    def client_gone(self) -> bool:
        """Whether the client closed its connection (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s - %s", self.address_string(), format % args)


# --------------------------------------------------------------------------------------------
# Running


class RunningServer:
    """A started server: ``url``, ``port``, ``app``; ``close()`` stops it."""

    def __init__(self, app: App, httpd: ThreadingHTTPServer, thread: threading.Thread):
        self.app, self.httpd, self.thread = app, httpd, thread
        self.port = httpd.server_address[1]
        host = app.settings.host
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.worker.stop()


def start_server(model, processor, settings: ServerSettings) -> RunningServer:
    """Start the worker and the HTTP server (in a thread) on ``settings.host``/``port``
    (port 0: a free one, see ``RunningServer.port``). Call it on the thread that loaded
    ``model`` (see ``server_worker.evaluate_all``).

    Raises:
        OSError: the address cannot be bound.
    """
    app = App(model, processor, settings)
    handler = type("BoundHandler", (Handler,), {"app": app})
    family = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family,
                                                           "daemon_threads": True})
    httpd = server_class((settings.host, settings.port), handler)
    app.worker.start()
    thread = threading.Thread(target=httpd.serve_forever, name="mlx-qwenvl-http", daemon=True)
    thread.start()
    return RunningServer(app, httpd, thread)


def parse_size(text: str) -> int:
    """'4GB', '512MiB', '1e9' or a plain number of bytes to bytes.

    Raises:
        click.BadParameter: anything else.
    """
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
             "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    value = str(text).strip().lower()
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = value[len(number):].strip()
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4GB, 512MiB, 1000000)") from None
    return int(size)


@click.command("server")
@click.option("--model", "model_path", required=True, help="Local model folder, 'demo', or a Hugging Face repo id.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port (0: any free one, printed at start).")
@click.option("--api-key", envvar="MLX_QWENVL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (env MLX_QWENVL_API_KEY).")
@click.option("--allowed-origins", default="*", show_default=True,
              help="CORS origins, comma-separated, or *.")
@click.option("--served-model-name", default=None,
              help="The model name clients see (default: the --model value).")
@click.option("--min-pixels", type=click.IntRange(min=1), default=None, help="Default smallest image area (pixels).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Default largest image area (pixels); requests may set their own.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Answer length when a request gives none.")
@click.option("--kv-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              callback=lambda ctx, param, value: None if value is None else int(value),
              help="Quantize the KV cache to these bits.")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              callback=lambda ctx, param, value: None if value is None else int(value),
              help="Quantization group size (default: 64, or the largest that divides the head size).")
@click.option("--quantized-kv-start", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Tokens in the cache before --kv-bits quantizes it (as mlx-lm).")
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait while one runs; more get 503.")
@click.option("--media-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="The only folder local image paths may be read from (default: no local paths).")
@click.option("--no-remote-images", is_flag=True, help="Never fetch image URLs (data URIs only).")
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=10, show_default=True,
              help="Conversations kept for reuse (0: off).")
@click.option("--prompt-cache-bytes", default="4GiB", show_default=True,
              help="Most memory the kept conversations may hold.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=128, show_default=True,
              help="Largest request body, in MiB (larger ones get 413 unread).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="auto", show_default=True)
@click.option("--verbose", is_flag=True, help="Log every request and load details.")
@friendly_errors
def server_command(model_path, revision, dtype, verbose, allowed_origins, prompt_cache_bytes, max_body_mb,
                   no_remote_images, served_model_name, **flags):
    """An OpenAI-compatible server (/v1/chat/completions) that keeps conversations cached."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    settings = ServerSettings(
        allowed_origins=tuple(o.strip() for o in allowed_origins.split(",") if o.strip()),
        served_model_name=served_model_name or model_path, allow_remote=not no_remote_images,
        prompt_cache_bytes=parse_size(prompt_cache_bytes), max_body_bytes=int(max_body_mb * 2**20), **flags)
    model, processor = load_for_cli(model_path, verbose, dtype, revision)
    from .generate import kv_group_size_for  # noqa: PLC0415

    # A group size that cannot work is refused now, not on every request.
    settings.kv_group_size = kv_group_size_for(model, settings.kv_bits, settings.kv_group_size)
    running = start_server(model, processor, settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        click.echo("note: listening beyond this machine without --api-key", err=True)
    click.echo(f"mlx-qwenvl server: {settings.served_model_name} at {running.url}/v1, chat page at "
               f"{running.url}/ (Ctrl-C stops)", err=True)
    try:
        while running.thread.is_alive():
            running.thread.join(1.0)
    except KeyboardInterrupt:
        click.echo("stopping", err=True)
    finally:
        running.close()
