"""The operator's HTTP client against hostile servers on 127.0.0.1: one dripping bytes (in the body
and in the headers), one sending an endless body, one announcing a huge one, one redirecting. Each
exchange ends within its deadline, with memory bounded by the cap."""

import json
import socket
import socketserver
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from kubetune_operator import bounded_http
from kubetune_operator.bounded_http import HttpError, request

Handler = Callable[[socket.socket, bytes], None]


def read_request(sock: socket.socket) -> bytes:
    """The request head and whatever body came with it (enough for these tests)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            want = int(line.split(b":", 1)[1])
            while len(body) < want:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                body += chunk
    return head + b"\r\n\r\n" + body


@contextmanager
def server(handler: Handler) -> Iterator[str]:
    """A threaded TCP server on 127.0.0.1 running `handler(socket, request bytes)` per connection."""

    class Handle(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                handler(self.request, read_request(self.request))
            except OSError:
                pass  # the client hung up: what these tests expect

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handle)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def answer(status: str, body: bytes, headers: str = "") -> Handler:
    def handle(sock: socket.socket, _: bytes) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
        sock.sendall(head.encode() + body)

    return handle


def drip_body(sock: socket.socket, _: bytes) -> None:
    """Headers at once, then one byte every 0.1 s, for up to 60 s: each read is quick, the whole never ends."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(600):
        sock.sendall(b"x")
        time.sleep(0.1)


def drip_headers(sock: socket.socket, _: bytes) -> None:
    """The status line, then header bytes one every 0.1 s: no chunk of body ever comes."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(600):
        sock.sendall(b"a")
        time.sleep(0.1)


def endless_body(sock: socket.socket, _: bytes) -> None:
    """A chunked body that does not end (bounded here at 2 GiB; the client stops long before)."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 65536 + b"y" * 65536 + b"\r\n"
    for _ in range(2**15):
        sock.sendall(chunk)


def silent(sock: socket.socket, _: bytes) -> None:
    """Accepts and says nothing for up to 30 s."""
    for _ in range(300):
        time.sleep(0.1)


def timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        fn()
    except BaseException as error:  # noqa: BLE001 - returned for the test to inspect
        return time.monotonic() - start, error
    return time.monotonic() - start, None


@pytest.mark.parametrize("handler", [drip_body, drip_headers, silent], ids=["body", "headers", "silent"])
def test_a_dripping_or_silent_server_is_cut_off_at_the_total_deadline(handler):
    with server(handler) as url:
        elapsed, error = timed(lambda: request("GET", url, deadline=1.0, max_bytes=1 << 20))
    assert isinstance(error, HttpError)
    assert "within 1s" in str(error)
    assert elapsed < 1.6  # the deadline is for the whole exchange, not per read


def test_an_endless_body_stops_at_the_cap_with_memory_bounded():
    with server(endless_body) as url:
        tracemalloc.start()
        try:
            elapsed, error = timed(lambda: request("GET", url, deadline=20, max_bytes=1 << 20))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(error, HttpError)
    assert "over the 1048576-byte cap" in str(error)
    assert peak < 8 * (1 << 20)  # the cap plus a read, not the stream
    assert elapsed < 10


def test_a_body_announced_over_the_cap_is_refused_before_it_is_read():
    def huge(sock: socket.socket, _: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n" + b"z" * 65536)
        time.sleep(2)

    with server(huge) as url:
        elapsed, error = timed(lambda: request("GET", url, deadline=5, max_bytes=1000))
    assert isinstance(error, HttpError)
    assert "300000000 bytes is over the 1000-byte cap" in str(error)
    assert elapsed < 1.5


def test_a_complete_answer_within_the_limits():
    with server(answer("200 OK", b'{"ok": true}', "Content-Type: application/json\r\nX-A: 1\r\n")) as url:
        response = request("GET", url + "/v1/models", deadline=5, max_bytes=100)
    assert response.status == 200 and response.ok
    assert response.json() == {"ok": True}
    assert response.headers["x-a"] == "1" and response.headers["content-type"] == "application/json"


def test_a_body_exactly_at_the_cap_is_accepted():
    with server(answer("200 OK", b"a" * 100)) as url:
        assert request("GET", url, deadline=5, max_bytes=100).body == b"a" * 100


def test_json_and_headers_are_sent():
    seen: list[bytes] = []

    def record(sock: socket.socket, data: bytes) -> None:
        seen.append(data)
        answer("202 Accepted", b"")(sock, data)

    with server(record) as url:
        response = request("POST", url + "/v1/load_lora_adapter", deadline=5, max_bytes=100,
                           headers={"Authorization": "Bearer k"}, json={"lora_name": "a"})  # fmt: skip
    assert response.status == 202
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/load_lora_adapter HTTP/1.1")
    assert b"\r\nauthorization: Bearer k\r\n" in head
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"lora_name": "a"}


def test_redirects_are_not_followed():
    hits: list[bytes] = []

    def target(sock: socket.socket, data: bytes) -> None:
        hits.append(data)
        answer("200 OK", b"secret")(sock, data)

    with server(target) as elsewhere:
        with server(answer("302 Found", b"", f"Location: {elsewhere}/x\r\n")) as url:
            response = request("GET", url, deadline=5, max_bytes=100)
    assert response.status == 302
    assert response.headers["location"].endswith("/x")
    assert hits == []


def test_the_environment_proxy_is_not_used(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with server(answer("200 OK", b"direct")) as url:
        assert request("GET", url, deadline=5, max_bytes=100).body == b"direct"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/", "not a url", "ftp://127.0.0.1/"])
def test_unreachable_or_unusable_urls_are_http_errors(url):
    with pytest.raises(HttpError):
        request("GET", url, deadline=2, max_bytes=100)


def test_a_server_that_does_not_speak_http_is_an_http_error():
    def garbage(sock: socket.socket, _: bytes) -> None:
        sock.sendall(b"\x00\x01 not http at all\r\n\r\n")

    with server(garbage) as url:
        with pytest.raises(HttpError):
            request("GET", url, deadline=2, max_bytes=100)


def test_a_reason_is_one_short_line():
    assert bounded_http.short("a\nb   c") == "a b c"
    assert len(bounded_http.short("x" * 5000)) == bounded_http.REASON_LIMIT
