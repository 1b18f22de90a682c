"""The worker's HTTP handler reads headers as pywsgi does and sends a small response at once."""
import io

import gevent
import gevent.socket
import pytest
from gevent.pywsgi import WSGIServer, headers_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_app.wire.handler import MAX_HEADERS, MAX_LINE, ONE_SEND_MAX, ChatHandler, read_headers

# lines made of what matters to a header parser, and lines of the usual form
odd_lines = st.text(alphabet="Ab-: \t\r\n\x0b\x0c\x85\xffFrom", max_size=12)
spaces = st.sampled_from(["", " ", "\t", " \t "])
plain_lines = st.builds("{}:{}{}{}{}".format,
                        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                min_size=1, max_size=8),
                        spaces,
                        st.text(alphabet=st.characters(min_codepoint=9, max_codepoint=255,
                                                       exclude_characters="\r\n"), max_size=12),
                        spaces, st.sampled_from(["\r\n", "\n"]))
heads = st.lists(st.one_of(odd_lines, plain_lines, plain_lines), max_size=8).map(
    lambda lines: "".join(lines).encode("latin-1"))


def parsed(message):
    return message.status, message.get_unixfrom(), message.items()


@settings(max_examples=500)
@given(heads, st.sampled_from([b"\r\n", b"\n", b""]))
def test_headers_are_read_as_pywsgi_reads_them(head, end):
    ours, theirs = io.BytesIO(head + end + b"body"), io.BytesIO(head + end + b"body")
    assert parsed(read_headers(ours)) == parsed(headers_factory(theirs))
    assert ours.read() == theirs.read()


def test_header_limits_are_http_clients():
    assert parsed(read_headers(io.BytesIO(b"X: " + b"y" * MAX_LINE + b"\r\n\r\n")))[0] == \
        "Line too long"
    with pytest.raises(Exception, match="more than 100 headers"):
        read_headers(io.BytesIO(b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n"))


class Recorder:
    """The connection's socket, recording what each sendall() carried."""

    def __init__(self, sock, sent):
        self.sock = sock
        self.sent = sent

    def sendall(self, data):
        self.sent.append(bytes(data))
        return self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def app(environ, start_response):
    websocket = environ.get("wsgi.websocket")
    if websocket is not None:  # gevent-websocket's own WebSocket: greet, refuse, or say nothing
        if environ["PATH_INFO"] == "/greet":
            websocket.send("hello")
        if environ["PATH_INFO"] == "/refuse":
            start_response("403 FORBIDDEN", [("Content-Type", "text/plain")])
            return [b"not ", b"from there"]
        return []
    size = int(environ["PATH_INFO"].strip("/"))
    if environ["QUERY_STRING"] == "chunked":  # no Content-Length: two chunks
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (part * size for part in (b"a", b"b"))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(size))])
    return [b"x" * size]


@pytest.fixture
def server():
    sent = []

    class Handler(ChatHandler):
        def __init__(self, sock, *args, **kwargs):
            super().__init__(Recorder(sock, sent), *args, **kwargs)

    srv = WSGIServer(("127.0.0.1", 0), app, handler_class=Handler, log=None)
    srv.start()
    srv.sent = sent
    yield srv
    srv.stop()


def exchange(server, request):
    """Send `request`; return everything the server sends until it closes."""
    with gevent.Timeout(5), gevent.socket.create_connection(("127.0.0.1", server.server_port)) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def get(server, path):
    return exchange(server, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    % path.encode())


def test_a_small_body_goes_out_with_the_head(server):
    response = get(server, "/300")
    assert response.endswith(b"\r\n\r\n" + b"x" * 300)
    assert server.sent == [response]


def test_an_empty_body_sends_the_head_alone(server):
    response = get(server, "/0")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"\r\n\r\n")
    assert server.sent == [response]


def test_a_big_body_is_not_copied_behind_the_head(server):
    response = get(server, f"/{ONE_SEND_MAX}")
    assert [len(s) for s in server.sent] == [response.index(b"\r\n\r\n") + 4, ONE_SEND_MAX]


def test_a_chunked_body_sends_its_first_chunk_with_the_head(server):
    response = get(server, "/5?chunked")
    assert response.endswith(b"\r\n\r\n5\r\naaaaa\r\n5\r\nbbbbb\r\n0\r\n\r\n")
    assert len(server.sent) == 3  # head and first chunk, second chunk, last chunk
    assert server.sent[0].endswith(b"\r\n\r\n5\r\naaaaa\r\n")


def handshake(server, path):
    return exchange(server, b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n" % path.encode())


def test_the_101_answer_goes_out_with_the_first_frame(server):
    received = handshake(server, "/greet")
    answer, _, frames = received.partition(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101")
    assert frames.startswith(b"\x81\x05hello")  # then the close frame
    assert server.sent[0] == answer + b"\r\n\r\n" + b"\x81\x05hello"


def test_the_101_answer_comes_before_the_close_of_an_app_that_says_nothing(server):
    received = handshake(server, "/quiet")
    assert received.startswith(b"HTTP/1.1 101")
    answer, _, frames = received.partition(b"\r\n\r\n")
    assert frames[:1] == b"\x88"  # a close frame
    assert len(server.sent) == 1


def test_a_websocket_the_app_refuses_gets_its_answer_instead_of_the_101(server):
    received = handshake(server, "/refuse")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 FORBIDDEN\r\n") and b"101" not in received
    assert b"\r\nContent-Length: 14\r\n" in head and body == b"not from there"
    assert server.sent == [received]
