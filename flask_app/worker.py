"""Serve one worker process: gevent's WSGI server with WebSocket support."""
import argparse
import logging
import signal
import socket

from gevent import monkey, signal_handler
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from . import logs, metrics
from .wire.handler import ChatHandler
from .wire.runners import Runners

log = logging.getLogger("scalechat.worker")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="scalechat-worker",
        description="Serve scalechat's pages and Socket.IO on one port. "
                    "Settings such as REDIS_URL and SECRET_KEY come from the environment.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8001, help="port to bind (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    return parser.parse_args(argv)


def run(application, config, start, drain, argv=None):
    """Serve `application` until SIGTERM or SIGINT, then stop gracefully.

    `start` starts the background work once listening. On a signal it stops accepting
    connections, calls `drain` (clients are sent to reconnect elsewhere, running handlers
    finish), then closes what is left.
    """
    args = parse_args(argv)
    logs.configure(config.worker_id, args.log_level)
    if not monkey.is_module_patched("socket"):
        raise SystemExit("scalechat-worker: sockets are not monkey-patched; "
                         "start it through wsgi.py (the scalechat-worker script)")
    server = WSGIServer((args.host, args.port), application,
                        handler_class=ChatHandler, log=None, error_log=log,
                        spawn=Runners().spawn)
    try:
        server.start()
    except OSError as exc:
        raise SystemExit(f"scalechat-worker: cannot listen on {args.host}:{args.port}: {exc}")
    if hasattr(socket, "TCP_DEFER_ACCEPT"):
        # accept a connection once its request has arrived, not to wait for it at once
        server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    metrics.forget_dead_workers()
    start()
    log.info("worker %s listening on http://%s:%d", config.worker_id, args.host, server.server_port)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal_handler(signum, stop.set)
    stop.wait()
    log.info("worker %s stopping: no new connections, moving clients away", config.worker_id)
    server.close()
    unfinished = drain()
    if unfinished:
        log.warning("worker %s: %d handlers still running after %ss",
                    config.worker_id, unfinished, config.drain_timeout)
    server.stop(timeout=1)
    log.info("worker %s stopped", config.worker_id)
