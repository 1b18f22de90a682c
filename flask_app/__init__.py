"""scalechat: live chat for Flask sites, across many gevent workers through Redis."""
import socketio
from flask import Flask

from . import admin, api, auth, health, jsonio, pages
from .config import Config
from .wire.engine import ChatPacket, ChatServer
from .events import ChatNamespace
from .redis.manager import ChatRedisManager
from .services import Services


def create_app(config=None):
    """Build the Flask app and its Socket.IO server; nothing connects yet.

    `config` is a Config, or a mapping of Config fields overriding the environment.
    """
    if not isinstance(config, Config):
        config = Config.from_env(**(config or {}))
    app = Flask(__name__)
    app.json = jsonio.FlaskJSON(app)
    app.config.update(
        SECRET_KEY=config.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.secure_cookies,
        SCALECHAT=config,
    )
    app.session_interface = auth.SessionInterface()
    services = Services.from_config(config)
    app.extensions["scalechat"] = services
    # the Admin UI's reports come from subclasses, so that without it nothing is added
    instrumented = bool(config.admin_password)
    server_class = admin.AdminChatServer if instrumented else ChatServer
    manager_class = admin.AdminRedisManager if instrumented else ChatRedisManager
    sio = server_class(
        async_mode="gevent",
        client_manager=manager_class(config.redis_url, config.channel, services.store,
                                     services.metrics, config.redis_pool),
        serializer=ChatPacket,
        json=jsonio,
        # each connection's packets are handled in order by one greenlet (engine.ChatSocket)
        async_handlers=False,
        cors_allowed_origins=config.cors_allowed_origins,
        max_http_buffer_size=config.max_payload,
        max_send_buffer=config.max_send_buffer,
    )
    sio.register_namespace(ChatNamespace(app, services))
    if instrumented:
        app.extensions["admin_ui"] = admin.AdminUI(sio, config, services.presence)
    app.extensions["socketio"] = sio
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.after_request(pages.add_security_headers)
    return app


def start_background(app):
    """Start the Redis listener and the presence heartbeat of a serving worker (and its
    server_stats for the Admin UI, when on)."""
    app.extensions["socketio"].namespace_handlers["/"].start_background()
    if "admin_ui" in app.extensions:
        app.extensions["admin_ui"].start()


def drain(app):
    """Send every client of this worker elsewhere and let running handlers finish."""
    return app.extensions["socketio"].namespace_handlers["/"].drain()


def create_application(app):
    """Return the WSGI application of a worker: Socket.IO in front of the Flask app."""
    return WorkerHeader(socketio.WSGIApp(app.extensions["socketio"], app),
                        app.config["SCALECHAT"].worker_id)


class WorkerHeader:
    """WSGI middleware naming the worker in every response, Engine.IO's included."""

    def __init__(self, wsgi_app, worker_id):
        self.wsgi_app = wsgi_app
        self.header = ("X-Scalechat-Worker", worker_id)

    def __call__(self, environ, start_response):
        def start_named(status, headers, exc_info=None):
            return start_response(status, [*headers, self.header], exc_info)
        return self.wsgi_app(environ, start_named)
