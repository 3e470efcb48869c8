"""HTTP servers on 127.0.0.1 that misbehave on purpose: what a tenant's pod can put behind the
address the operator scrapes. Every one is bounded in time (a `stop` event ends it, and each
responder has its own upper bound) and listens on loopback only."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Responder = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@contextmanager
def endpoint(respond: Responder) -> Iterator[str]:
    """A server whose every GET is answered by `respond(handler, stop)`; yields its /metrics URL."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            try:
                respond(self, stop)
            except OSError:  # the client gave up: what the test wants
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def drip(handler: BaseHTTPRequestHandler, stop: threading.Event, seconds: float = 30) -> None:
    """200, then 8 bytes every 0.1 s for up to `seconds`: each read succeeds well inside any
    per-read timeout, so only a total deadline ends it."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(10**6))
    handler.end_headers()
    for _ in range(int(seconds * 10)):
        if stop.wait(0.1):
            return
        handler.wfile.write(b"# xxxxx\n")
        handler.wfile.flush()


def huge(handler: BaseHTTPRequestHandler, stop: threading.Event, size: int = 48 * 2**20, length: bool = True) -> None:
    """200 and `size` bytes of valid-looking Prometheus text, announced or not."""
    handler.send_response(200)
    if length:
        handler.send_header("Content-Length", str(size))
    handler.end_headers()
    chunk = b"kubetune_train_step 1\n" * 3000
    sent = 0
    while sent < size and not stop.is_set():
        handler.wfile.write(chunk)
        sent += len(chunk)
