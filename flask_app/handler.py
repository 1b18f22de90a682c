"""The worker's HTTP handler: gevent-websocket's, sending a response's head and body together.

pywsgi sends a response's status line and headers with one send() and its body with
another. On a busy worker each send() costs about as much as the Flask view of a small
JSON answer, and the second small segment can wait on Nagle's algorithm; a body of up to
ONE_SEND_MAX bytes now goes out with its head in one send().
"""
from geventwebsocket.handler import WebSocketHandler

ONE_SEND_MAX = 64 * 1024  # above this, copying the body costs more than a second send()


class ChatHandler(WebSocketHandler):
    _holding = False  # between a response's head and the first part of its body
    _head = None

    def _write_with_headers(self, data):
        self._holding = True
        try:
            super()._write_with_headers(data)  # calls _sendall(head), then _write(data)
        finally:
            self._holding = False
        head, self._head = self._head, None
        if head is not None:  # no body followed: the head alone
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
