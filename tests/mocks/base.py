"""What the mock upstreams (upstream.py) and the Entra ID / IMDS mock (entra.py) share (stdlib only).

* `ScriptedServer`: a threaded HTTP/1.1 server that tracks its connections, so that `stop()` drops
  keep-alive ones (an upstream that went away) and a scripted reset closes one with a TCP RST;
  and the script of steps (`POST /__mock/script`) the next requests take, in order.
* `ScriptedHandler`: the request plumbing of both handlers: chunked or sized bodies, the control
  API under `/__mock/`, recording every request with its answered status and duration, resets.
  A subclass supplies `_record(split, body) -> dict` and `_handle(rec, split, body)`.
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Abort(Exception):
    """Raised to drop a connection without answering (a reset)."""


def mask_key(key: str) -> str:
    """Mask a credential the way OpenAI does in its 401 message (never echo a secret)."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def split_list(value) -> list:
    """A comma-separated string or a list, as a list of strings (None: empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    quiet = True

    def _init_state(self):
        """The state every mock keeps; call before ThreadingHTTPServer.__init__."""
        self.lock = threading.RLock()
        self.script: list[dict] = []
        self.log: list[dict] = []
        self.leaks: list[dict] = []
        self._seq = 0
        self._conns: set = set()
        self._aborted: set = set()
        self._stopped = False

    # -- connections ---------------------------------------------------------------------------

    def process_request(self, request, client_address):
        with self.lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.lock:
            self._conns.discard(request)
            aborted = request in self._aborted
            self._aborted.discard(request)
        if aborted:  # already reset by the handler: closing is all that is left
            try:
                request.close()
            except OSError:
                pass
            return
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, Abort, OSError)):
            return
        if not self.quiet:
            super().handle_error(request, client_address)

    def stop(self):
        """Stop serving and drop every open connection (an upstream that went away)."""
        if self._stopped:
            return
        self._stopped = True
        self.shutdown()
        self.server_close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            for op in (lambda c: c.shutdown(socket.SHUT_RDWR), lambda c: c.close()):
                try:
                    op(conn)
                except OSError:
                    pass

    # -- the control API -----------------------------------------------------------------------

    def state(self) -> dict:
        raise NotImplementedError

    def reset(self):
        raise NotImplementedError

    def _views(self) -> dict:
        """This mock's own GET paths beside requests, leaks and state: {path: what it shows}."""
        return {}

    def _set(self, path: str, data) -> tuple[int, object] | None:
        """This mock's own POST paths: (status, JSON object), or None for a path it does not have."""
        return None

    def control(self, method: str, path: str, data=None) -> tuple[int, object]:
        """The control API (also called directly by in-process test helpers): (status, JSON object)."""
        try:
            if path == "/__mock/health":
                return (200, {"ok": True, "provider": self.provider, "name": self.name})
            views = {"/__mock/requests": lambda: self.log, "/__mock/leaks": lambda: self.leaks, **self._views()}
            if path in views:
                with self.lock:
                    return (200, copy.deepcopy(views[path]()))
            if path == "/__mock/state":
                return (200, self.state())
            if method != "POST":
                return (405, {"error": f"{method} {path}: use POST"})
            if path == "/__mock/reset":
                self.reset()
                return (200, {"ok": True})
            if path == "/__mock/script":
                if isinstance(data, dict) and "steps" in data:
                    self.set_script(data["steps"], append=bool(data.get("append")))
                else:
                    self.set_script(data if data is not None else [])
                return (200, {"ok": True, "script": self.state()["script"]})
            if path == "/__mock/forbid":
                with self.lock:
                    self.forbidden = split_list((data or {}).get("secrets"))
                return (200, {"ok": True, "count": len(self.forbidden)})
            answer = self._set(path, data)
            if answer is not None:
                return answer
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return (400, {"error": str(e)})
        return (404, {"error": f"unknown control path {path}"})

    # -- the script ----------------------------------------------------------------------------

    def set_script(self, steps, append=False):
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise ValueError("script must be a JSON list of objects")
        norm = []
        for s in steps:
            s = dict(s)
            rep = s.pop("repeat", 1)
            if rep == "forever" or rep == -1:
                s["_left"] = None
            else:
                rep = int(rep)
                if rep < 1:
                    continue
                s["_left"] = rep
            norm.append(s)
        with self.lock:
            if append:
                self.script.extend(norm)
            else:
                self.script = norm

    def next_step(self) -> dict | None:
        """The script's next step (its repeat count taken down by one), or None."""
        with self.lock:
            if not self.script:
                return None
            step = self.script[0]
            if step["_left"] is not None:
                step["_left"] -= 1
                if step["_left"] <= 0:
                    self.script.pop(0)
            return {k: v for k, v in step.items() if k != "_left"}


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def setup(self):
        try:  # answers (SSE events above all) leave at once, not after the client's delayed ACK
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._handshake()
        super().setup()

    def _handshake(self):
        """A TLS server's handshake (the upstream mock's); nothing for plain HTTP."""

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write(f"[mock {self.server.name}] {self.address_string()} {fmt % args}\n")

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (Abort, BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise Abort("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:  # trailers until an empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else b""

    def _set_status(self, status: int):
        # Recorded before the answer is written, so a client that reads the request log right
        # after its answer never sees the status missing.
        self._status = status
        rec = getattr(self, "_rec", None)
        if rec is not None:
            rec["status"] = status

    def _send_control(self, status: int, obj):
        body = json.dumps(obj, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _abort(self):
        """Drop the connection with a TCP reset, answering nothing."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        with self.server.lock:
            self.server._aborted.add(self.request)
        self.close_connection = True
        raise Abort()

    def _begin(self):
        """Per-request fields, reset before each request on a kept-alive connection."""
        self._status = None
        self._rec = None

    def _dispatch(self):
        self._begin()
        split = urlsplit(self.path)
        try:
            body = self._read_body()
        except Abort:
            self.close_connection = True
            return
        if split.path.startswith("/__mock/"):
            try:
                data = json.loads(body) if body.strip() else None
            except ValueError:
                return self._send_control(400, {"error": "body is not JSON"})
            return self._send_control(*self.server.control(self.command, split.path, data))
        rec = self._record(split, body)
        self._rec = rec
        try:
            self._handle(rec, split, body)
        except Abort:
            rec["closed"] = True
            raise
        except (BrokenPipeError, ConnectionResetError):
            rec["closed"] = True
            self.close_connection = True
        finally:
            rec["status"] = self._status
            rec["duration_ms"] = int((time.time() - rec["time"]) * 1000)

    def _record(self, split, body: bytes) -> dict:
        raise NotImplementedError

    def _handle(self, rec, split, body: bytes):
        raise NotImplementedError


def serve_in_thread(server: ScriptedServer):
    """Serve in a background thread: (server, thread)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"mock-{server.name}-{server.port}", daemon=True)
    thread.start()
    return server, thread


def serve_until_signalled(server: ScriptedServer, banner: str) -> int:
    """Serve in this thread until SIGTERM or SIGINT (a process of its own: `make run`)."""

    def _term(*_):
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    print(banner, flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0
