"""The Socket.IO Admin UI: every worker reports its chat connections, rooms and events on
/admin, and `scalechat serve-admin` serves the UI's own pages (from npm) on 127.0.0.1.

python-socketio's InstrumentedServer patches socketio.Server, its client manager and
engineio's Socket at run time, and our classes go around every patch: ChatSocket replaces the
Socket methods it wraps, chat messages reach rooms from Redis without Server.emit, and only
/admin is a function namespace. Here the same reports come from named subclasses, used only
while the Admin UI is on, so the chat's path is untouched when it is off:

- AdminChatServer: connections refused, disconnects and events received;
- AdminRedisManager: connections, rooms joined and left, and every delivery on this worker,
  those driven by Redis included; it answers an admin's request for this worker's sockets;
- AdminEngineServer and AdminChatSocket: packets and bytes, the switch to WebSocket, and the
  UI's origin (accepted by Engine.IO, then refused on every namespace but /admin);
- AdminUI: python-socketio's InstrumentedServer, hooked to the above instead of patching.

Reports are emitted on /admin through the client manager, so an operator connected to any
worker sees every worker, each under its SCALECHAT_WORKER_ID.
"""
import hmac
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs

import socketio
from flask import Flask, Response, abort, send_from_directory
from socketio.admin import HOSTNAME, PID, InstrumentedServer

from .wire.engine import ChatServer, ChatSocket, EngineServer
from .redis.manager import ChatRedisManager

log = logging.getLogger(__name__)
NAMESPACE = "/admin"
USERNAME = "admin"
FEATURES = ["AGGREGATED_EVENTS", "ALL_EVENTS", "DISCONNECT"]
# Messages between workers on the client manager's channel: a batch of records for the admins,
# and an admin's request for the sockets of the other workers.
RECORDS = "scalechat:admin_records"
SOCKETS_WANTED = "scalechat:admin_sockets_wanted"
HIDDEN_HEADERS = frozenset({"cookie", "authorization"})  # operators see no user's credentials


def ui_origins(config):
    """The origins of the pages `scalechat serve-admin` serves (directly or through a tunnel)."""
    return (f"http://127.0.0.1:{config.admin_ui_port}", f"http://localhost:{config.admin_ui_port}")


def _iso(timestamp=None):
    return datetime.fromtimestamp(timestamp or time.time(), timezone.utc).isoformat()


def _size(pkt):
    """Bytes of an Engine.IO packet without encoding it again: its type and its payload."""
    return 1 + (len(pkt.data) if isinstance(pkt.data, (str, bytes)) else 0)


class Traffic:
    """Packets and bytes through this worker's sessions since the last server_stats."""

    __slots__ = ("packets_in", "bytes_in", "packets_out", "bytes_out")

    def __init__(self):
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0

    def move_to(self, event_buffer):
        """Add the counts to the UI's aggregated events, and start again from zero."""
        for kind, count in (("packetsIn", self.packets_in), ("bytesIn", self.bytes_in),
                            ("packetsOut", self.packets_out), ("bytesOut", self.bytes_out)):
            if count:
                event_buffer.push(kind, count)
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0


class AdminChatSocket(ChatSocket):
    """A ChatSocket that counts its packets and tells when it has moved to WebSocket."""

    def send(self, pkt):
        traffic = self.server.traffic
        traffic.packets_out += 1
        traffic.bytes_out += _size(pkt)
        super().send(pkt)

    def receive(self, pkt):
        traffic = self.server.traffic
        traffic.packets_in += 1
        traffic.bytes_in += _size(pkt)
        super().receive(pkt)

    def _on_upgrade(self, data):
        super()._on_upgrade(data)
        if self.upgraded:  # called from the loop, where nothing may block: report elsewhere
            self.server.start_background_task(self.server.on_upgrade, self.sid)


class AdminEngineServer(EngineServer):
    """EngineServer whose sessions count their traffic, and which accepts the UI's origin."""

    socket_class = AdminChatSocket

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.traffic = Traffic()
        self.admin_origins = ()
        self.on_upgrade = lambda eio_sid: None

    def _cors_allowed_origins(self, environ):
        allowed = super()._cors_allowed_origins(environ)
        return None if allowed is None else [*allowed, *self.admin_origins]

    def chat_allows(self, environ):
        """Whether the chat itself accepts the origin of this request (the site's, or listed)."""
        origin = environ.get("HTTP_ORIGIN")
        if not origin or origin not in self.admin_origins:
            return True  # Engine.IO has already checked every other origin
        allowed = super()._cors_allowed_origins(environ)
        return allowed is None or origin in allowed


class AdminChatServer(ChatServer):
    """ChatServer reporting disconnects and received events, and keeping the UI's origin to /admin."""

    admin_ui = None  # the AdminUI, once attached

    def _engineio_server_class(self):
        return AdminEngineServer

    def _trigger_event(self, event, namespace, *args):
        if namespace == NAMESPACE or self.admin_ui is None:
            return super()._trigger_event(event, namespace, *args)
        sid = args[0]
        if event == "connect":
            if not self.eio.chat_allows(args[1]):
                raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        elif event == "disconnect":
            self.admin_ui.report_disconnect(sid, namespace, args[1] if len(args) > 1 else None)
        else:
            self.admin_ui.report("event_received", namespace, sid, [event, *args[1:]])
        return super()._trigger_event(event, namespace, *args)


class AdminReports(socketio.Manager):
    """Reports of the local client manager: connections, rooms, and deliveries.

    It comes after PubSubManager in AdminRedisManager's bases, so its emit() is the one that
    delivers to this worker's clients, whether the emit began here or arrived from Redis.
    """

    admin_ui = None  # the AdminUI, once attached

    def connect(self, sid, namespace):
        sid = super().connect(sid, namespace)
        if self.admin_ui is not None:
            if namespace == NAMESPACE:
                self.server.start_background_task(self.admin_ui.welcome, sid)
            else:
                self.admin_ui.report_connect(sid, namespace)
        return sid

    def emit(self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None,
             **kwargs):
        super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback,
                     to=to, **kwargs)
        if self.admin_ui is not None and namespace != NAMESPACE:
            skipped = skip_sid if isinstance(skip_sid, list) else [skip_sid]
            sids = [sid for sid, _ in self.get_participants(namespace, to or room)
                    if sid not in skipped]
            if sids:  # one record for all: the UI's one line per recipient is made at the end
                args = [event, *data] if isinstance(data, tuple) else [event, data]
                self.admin_ui.report("event_sent", namespace, sids, args)

    def basic_enter_room(self, sid, namespace, room, eio_sid=None):
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        if room != sid and self._reported(sid, namespace, room):  # its own: in socket_connected
            self.admin_ui.report("room_joined", namespace, room, sid)

    def basic_leave_room(self, sid, namespace, room):
        if self._reported(sid, namespace, room):
            self.admin_ui.report("room_left", namespace, room, sid)
        super().basic_leave_room(sid, namespace, room)

    def _reported(self, sid, namespace, room):
        """Rooms of chat sockets, but not of a connection being refused."""
        return (self.admin_ui is not None and room is not None and namespace != NAMESPACE
                and sid not in self.pending_connect.get(namespace, ()))


class AdminRedisManager(ChatRedisManager, AdminReports):
    """ChatRedisManager with the Admin UI's reports, carried to every worker in batches.

    A publish per record (python-socketio's way) would cost a Redis round trip per recipient
    of every message, in the listener that delivers them: a room of 200 stopped receiving.
    """

    def publish_records(self, records):
        """Give a batch of records to the admins connected here, and to the other workers."""
        self._deliver_records(records)
        self._publish({"method": "emit", "event": RECORDS, "data": [records],
                       "namespace": NAMESPACE, "room": None, "host_id": self.host_id})

    def request_sockets(self, admin_sid):
        """Ask the other workers to send their sockets to an admin connected here."""
        self._publish({"method": "emit", "event": SOCKETS_WANTED, "data": [admin_sid],
                       "namespace": NAMESPACE, "room": admin_sid, "host_id": self.host_id})

    def _handle_emit(self, message):
        if message.get("namespace") == NAMESPACE:
            if message.get("event") == RECORDS:
                return self._deliver_records(message["data"][0])
            if message.get("event") == SOCKETS_WANTED:
                if self.admin_ui is not None:
                    self.server.start_background_task(self.admin_ui.send_sockets,
                                                      message["data"][0])
                return
        super()._handle_emit(message)

    def _deliver_records(self, records):
        if NAMESPACE not in self.rooms:
            return  # no admin here
        for kind, args in records:
            if kind == "event_sent":
                namespace, sids, event_args, at = args
                for sid in sids:
                    self.emit(kind, (namespace, sid, event_args, at), namespace=NAMESPACE,
                              ignore_queue=True)
            else:
                self.emit(kind, tuple(args), namespace=NAMESPACE, ignore_queue=True)


class AdminUI(InstrumentedServer):
    """python-socketio's server side of the Admin UI, fed by the Admin* classes above.

    InstrumentedServer's instrument() patches library classes; ours registers /admin and
    attaches itself to our subclasses, which call report_*() and report() as things happen.
    The UI is read-only but for disconnecting a socket, on any worker: joining, leaving or
    emitting from it would go around the chat's presence and history.
    """

    def __init__(self, sio, config, presence):
        self.presence = presence
        self.connected_at = {}
        self.pending = []  # records not yet published
        self.publishing = False
        self.origins = ui_origins(config)
        self.password = config.admin_password
        super().__init__(sio, auth={"username": USERNAME, "password": config.admin_password},
                         mode="development", read_only=True, server_id=config.worker_id,
                         namespace=NAMESPACE)

    def instrument(self):
        self.sio.on("connect", self.admin_connect, namespace=NAMESPACE)
        self.sio.on("_disconnect", self.admin_disconnect, namespace=NAMESPACE)
        self.sio.eio.on("connect", self._handle_eio_connect)
        self.sio.eio.on("disconnect", self._handle_eio_disconnect)
        self.sio.eio.admin_origins = self.origins
        self.sio.eio.on_upgrade = self.report_upgrade
        self.sio.admin_ui = self.sio.manager.admin_ui = self

    def start(self):
        """Send server_stats from now on, so that a worker with no client is listed too."""
        if self.stats_task is None:
            self.stop_stats_event = self.sio.eio.create_event()
            self.stats_task = self.sio.start_background_task(self._emit_server_stats)

    def admin_connect(self, sid, environ, client_auth):
        if not (isinstance(client_auth, dict) and client_auth.get("username") == USERNAME
                and isinstance(client_auth.get("password"), str)
                and hmac.compare_digest(client_auth["password"].encode(), self.password.encode())):
            raise socketio.exceptions.ConnectionRefusedError("invalid credentials")

    def admin_disconnect(self, _, namespace, close, room_filter=None):
        """Disconnect one socket, wherever it is connected (the UI's only write)."""
        if isinstance(room_filter, str) and namespace != NAMESPACE:
            self.sio.disconnect(room_filter, namespace=namespace)

    def welcome(self, sid):
        """Tell a new admin what it can do and every socket: this worker's, then the others'."""
        self.sio.emit("config", {"supportedFeatures": FEATURES}, to=sid, namespace=NAMESPACE)
        self.sio.emit("all_sockets", list(self._local_sockets()), to=sid, namespace=NAMESPACE)
        self.sio.manager.request_sockets(sid)

    def send_sockets(self, admin_sid):
        """Send this worker's sockets to an admin connected to another worker."""
        for serialized in self._local_sockets():
            self.sio.emit("socket_connected", (serialized, serialized["handshake"]["time"]),
                          to=admin_sid, namespace=NAMESPACE)

    def _local_sockets(self):
        for namespace in list(self.sio.manager.get_namespaces()):
            if namespace != NAMESPACE:
                for sid, eio_sid in list(self.sio.manager.get_participants(namespace, None)):
                    yield self.serialize_socket(sid, namespace, eio_sid)

    def report(self, kind, *args):
        """Record something for every admin, stamped now; it is published with its batch."""
        self._add(kind, [*args, _iso()])

    def _add(self, kind, args):
        self.pending.append((kind, args))
        if not self.publishing:  # what else happens before this greenlet yields joins the batch
            self.publishing = True
            self.sio.start_background_task(self._publish_pending)

    def _publish_pending(self):
        try:
            while self.pending:
                records, self.pending = self.pending, []
                self.sio.manager.publish_records(records)
        except Exception as exc:
            log.warning("could not publish %d Admin UI records: %s", len(records), exc)
        finally:
            self.publishing = False

    def report_connect(self, sid, namespace):
        self.connected_at[sid] = time.time()
        serialized = self.serialize_socket(sid, namespace)
        self._add("socket_connected", [serialized, serialized["handshake"]["time"]])

    def report_disconnect(self, sid, namespace, reason):
        self.connected_at.pop(sid, None)
        self.report("socket_disconnected", namespace, sid, reason)

    def report_upgrade(self, eio_sid):
        for namespace in list(self.sio.manager.get_namespaces()):
            sid = self.sio.manager.sid_from_eio_sid(eio_sid, namespace)
            if sid is not None and namespace != NAMESPACE:
                self._add("socket_updated", [{"id": sid, "nsp": namespace,
                                              "transport": "websocket"}])

    def serialize_socket(self, sid, namespace, eio_sid=None):
        """A socket as the UI shows it, with its user and without any credentials."""
        if eio_sid is None:
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        eio_socket = self.sio.eio.sockets.get(eio_sid)
        environ = self.sio.environ.get(eio_sid, {})
        connected = self.connected_at.get(sid)
        conn = self.presence.connection(sid)
        headers = {key[5:].lower().replace("_", "-"): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        return {
            "id": sid,
            "clientId": eio_sid,
            "transport": "websocket" if eio_socket is not None and eio_socket.upgraded
                         else "polling",
            "nsp": namespace,
            "data": {"user": conn.user.name, "user_id": conn.user.id} if conn is not None else {},
            "handshake": {
                "address": environ.get("HTTP_X_FORWARDED_FOR", environ.get("REMOTE_ADDR", "")),
                "headers": {key: value for key, value in headers.items()
                            if key not in HIDDEN_HEADERS},
                "query": {key: values[0] if len(values) == 1 else values
                          for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()},
                "secure": environ.get("wsgi.url_scheme") == "https"
                          or environ.get("HTTP_X_FORWARDED_PROTO") == "https",
                "url": environ.get("PATH_INFO", ""),
                "issued": (connected or 0) * 1000,
                "time": _iso(connected) if connected else "",
            },
            "rooms": self.sio.manager.get_rooms(sid, namespace),
        }

    def _emit_server_stats(self):
        started = time.time()
        while not self.stop_stats_event.is_set():
            self.sio.sleep(self.server_stats_interval)
            self.sio.emit("server_stats", self.server_stats(started), namespace=NAMESPACE)

    def server_stats(self, started):
        """This worker's entry on the UI's dashboard: every namespace, the chat's included."""
        self.sio.eio.traffic.move_to(self.event_buffer)
        sockets = list(self.sio.eio.sockets.values())
        rooms = self.sio.manager.rooms
        return {
            "serverId": self.server_id,
            "hostname": HOSTNAME,
            "pid": PID,
            "uptime": time.time() - started,
            "clientsCount": len(sockets),
            "pollingClientsCount": sum(1 for eio_socket in sockets if not eio_socket.upgraded),
            "aggregatedEvents": self.event_buffer.get_and_clear(),
            "namespaces": [{"name": name, "socketsCount": len(rooms.get(name, {}).get(None, ()))}
                           for name in sorted({*self.sio.handlers, *self.sio.namespace_handlers})],
        }


def ui_app(config):
    """The Flask app serving the Admin UI's pages, from the npm package, with no outside link."""
    modules = Path(config.node_modules)
    dist = modules / "@socket.io" / "admin-ui" / "ui" / "dist"
    icons = modules / "@mdi" / "font"
    if not (dist / "index.html").is_file() or not (icons / "css").is_dir():
        raise FileNotFoundError(f"the Admin UI is not installed in {modules}: run deploy/install")
    index = _without_outside_links((dist / "index.html").read_text())
    app = Flask(__name__, static_folder=None)

    @app.get("/")
    def page():
        return Response(index, mimetype="text/html")

    @app.get("/mdi/<path:name>")
    def icon_font(name):
        return send_from_directory(icons, name)

    @app.get("/<path:name>")
    def built_file(name):
        if name.endswith(".map"):
            abort(404)
        return send_from_directory(dist, name)

    app.after_request(_ui_security_headers)
    return app


def _without_outside_links(index):
    """Point the page's icon font at our copy from npm, and drop its web font (Roboto)."""
    def local(link):
        if "@mdi/font" in link.group("href"):
            return '<link rel="stylesheet" href="mdi/css/materialdesignicons.min.css">'
        return ""
    return re.sub(r'<link rel="stylesheet" href="(?P<href>https?://[^"]+)">', local, index)


def _ui_security_headers(response):
    """Scripts and styles from here only; sockets to any scalechat the operator names."""
    response.headers.update({
        "Content-Security-Policy": (
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self'; connect-src 'self' http: https: ws: wss:; "
            "object-src 'none'; base-uri 'self'; frame-ancestors 'none'"),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    })
    return response
