"""The worker's HTTP handler: gevent-websocket's, with a cheaper way in and out.

In: pywsgi parses request headers with the `email` package (http.client.parse_headers),
a tenth of the CPU a worker spends on a client that logs in and connects. Lines of the
usual `Name: value` form are split here instead; a request with any other line (folded,
a bare CR, no name, ...) still goes through the `email` parser, so every request is read
exactly as before.

Out: pywsgi sends a response's status line and headers with one send() and its body with
another; a body of up to ONE_SEND_MAX bytes now goes out with its head in one send(). The
101 answer to a WebSocket handshake waits for the connection's first frame: whoever takes
the socket (transport.take_socket) sends it first, and gevent-websocket's own writes put
it in front of theirs. An application that refuses the WebSocket instead (an origin it does
not allow, an unknown session) answers with a status of its own, which then goes out in
place of the 101: the client learns why it was refused rather than seeing a closed socket.
"""
import email.parser
import http.client
import re

from gevent.pywsgi import OldMessage
from geventwebsocket.handler import WebSocketHandler

ONE_SEND_MAX = 64 * 1024  # above this, copying the body costs more than a second send()
MAX_LINE = 65536  # http.client's limits on a header line and on the number of lines
MAX_HEADERS = 100
# a field name of the characters `email` accepts, a colon, a value without CR or LF
PLAIN_LINE = re.compile(rb"[!-9;-~]+:[^\r\n]*\r?\n")


def read_headers(fp):
    """Read a request's header lines as http.client.parse_headers does, parsing plain ones fast."""
    lines = []
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            message = OldMessage()
            message.status = "Line too long"  # as pywsgi answers http.client's LineTooLong
            return message
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            break
    message = OldMessage()
    for line in lines[:-1]:
        if not PLAIN_LINE.fullmatch(line):
            text = b"".join(lines).decode("iso-8859-1")
            return email.parser.Parser(_class=OldMessage).parsestr(text)
        name, value = line.decode("iso-8859-1").split(":", 1)
        message.set_raw(name, value.lstrip(" \t").rstrip("\r\n"))
    return message


class ChatHandler(WebSocketHandler):
    """gevent-websocket's request handler with the reading and writing described above."""

    _holding = False  # between a response's head and the first part of its body
    _head = None
    upgrade_answer = None  # the 101 answer to a WebSocket handshake, until the first frame

    def MessageClass(self, fp, *args):  # noqa: N802 (pywsgi's name)
        return read_headers(fp)

    def log_request(self):
        """Write no access log: gevent-websocket formatted a line per request to drop it."""

    def upgrade_connection(self):
        result = super().upgrade_connection()
        websocket = getattr(self, "websocket", None)
        if websocket is not None:  # the handshake is accepted: 101 follows
            write = websocket.raw_write

            def write_after_answer(data):
                answer, self.upgrade_answer = self.upgrade_answer, None
                write(data if answer is None else answer + data)
            websocket.raw_write = write_after_answer
        return result

    def run_websocket(self):
        """Run the application on the upgraded request; send its refusal if it answers one.

        gevent-websocket ignores the status an application answers once it has accepted the
        handshake; here it goes out while the 101 is still held, and the connection closes.
        """
        websocket, answered = self.websocket, []

        def start_response(status, headers, exc_info=None):
            answered[:] = [status, headers]
        try:
            result = self.application(self.environ, start_response)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            if answered and self.upgrade_answer is not None:
                self.upgrade_answer = None
                websocket.closed, websocket.handler = True, None  # no close frame after it
                self._send_refusal(*answered, body)
        finally:
            if not websocket.closed:
                websocket.close()
            self.environ["wsgi.websocket"] = None
            self.websocket = None

    def _send_refusal(self, status, headers, body):
        lines = [f"HTTP/1.1 {status}"]
        lines += [f"{name}: {value}" for name, value in headers
                  if name.lower() not in ("content-length", "connection")]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        self._sendall("\r\n".join(lines).encode("latin-1") + body)

    def _write_with_headers(self, data):
        self._holding = True
        try:
            super()._write_with_headers(data)  # calls _sendall(head), then _write(data)
        finally:
            self._holding = False
        head, self._head = self._head, None
        if head is not None and self.code == 101 and self.environ.get("wsgi.websocket"):
            self.upgrade_answer = bytes(head)
        elif head is not None:  # no body followed: the head alone
            super()._sendall(head)

    def _sendall(self, data):
        if self._holding:
            if self._head is None:
                self._head = data
                return
            head, self._head = self._head, None
            self._holding = False
            if len(head) + len(data) <= ONE_SEND_MAX:
                data = head + data
            else:
                super()._sendall(head)
        super()._sendall(data)
