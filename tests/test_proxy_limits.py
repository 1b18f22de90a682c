"""The proxy under a flood of slow, half-sent requests from one address."""
import selectors
import socket
import time

from deployment import Stack, running

SLOW_CLIENTS = 400
REQUEST_TIMEOUT = 5
CONN_RATE = 100
# the stack's open-file limit: HAProxy's maxconn becomes (800 - 200) / 2 = 300, fewer than the
# slow clients, as a real flood outnumbers a real maxconn
OPEN_FILES = 800


def half_request(port):
    """A client that sends the start of a request and then nothing; None if refused at once."""
    sock = socket.socket()
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: chat.example\r\nUser-Agent: slow")
    except (ConnectionResetError, BrokenPipeError):
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def get_from(address, port, path):
    """A whole request from `address`, as another client of the site; its status line."""
    with socket.socket() as sock:
        sock.settimeout(20)
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: chat.example\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


def wait_until_closed(sockets, bound=60):
    """Read each socket until the proxy closes it: {socket: (monotonic time, first bytes)}."""
    closed, selector = {}, selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ, b"")
    deadline = time.monotonic() + bound
    while True:
        for key, _ in selector.select(timeout=min(1, bound)):
            try:
                chunk = key.fileobj.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                selector.modify(key.fileobj, selectors.EVENT_READ, key.data + chunk)
            else:
                closed[key.fileobj] = (time.monotonic(), key.data)
                selector.unregister(key.fileobj)
        if len(closed) == len(sockets) or time.monotonic() >= deadline:
            break
    selector.close()
    return closed


def test_slow_half_requests_neither_hold_the_proxy_nor_keep_other_addresses_out(service_tmp):
    stack = Stack(service_tmp / "var", workers=1, open_files=OPEN_FILES,
                  PROXY_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT), PROXY_CONN_RATE=str(CONN_RATE))
    port = int(stack.env["PORT"])
    with running(stack):
        started = time.monotonic()
        attempts = [half_request(port) for _ in range(SLOW_CLIENTS)]
        opened = time.monotonic()
        slow = [sock for sock in attempts if sock is not None]
        status = get_from("127.0.0.2", port, "/healthz")
        served = time.monotonic()
        still_open = len(slow) - len(wait_until_closed(slow, bound=0))
        closed = wait_until_closed(slow)
        frontend = stack.server_stats("FRONTEND", proxy="public")
        for sock in slow:
            sock.close()

    assert status == "HTTP/1.1 200 OK"
    assert len(closed) == len(slow), "slow clients the proxy never closed"
    timed_out = sorted(at for at, answer in closed.values() if answer.startswith(b"HTTP/1.1 408"))
    refused = SLOW_CLIENTS - len(slow) + sum(not answer for _, answer in closed.values())
    assert len(timed_out) + refused == SLOW_CLIENTS
    assert refused and int(frontend["dcon"]) >= refused  # beyond the address's rate
    # the proxy answered the other address while it still held slow clients, which it cut after
    assert still_open and timed_out and timed_out[0] > served
    print(f"\n{SLOW_CLIENTS} slow half-requests from 127.0.0.1 opened in {opened - started:.2f} s: "
          f"{refused} refused at once by the rate limit ({CONN_RATE} per 10 s), "
          f"{len(timed_out)} held, then answered 408 between {timed_out[0] - started:.1f} s and "
          f"{timed_out[-1] - started:.1f} s after the first opened "
          f"(PROXY_REQUEST_TIMEOUT={REQUEST_TIMEOUT}); a client from 127.0.0.2 was served in "
          f"{(served - opened) * 1000:.0f} ms while {still_open} were still open")
