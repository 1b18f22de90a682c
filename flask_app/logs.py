"""Structured logs: one JSON object per line on stdout, each naming the worker."""
import logging
import sys

from pythonjsonlogger.orjson import OrjsonFormatter


class WorkerFilter(logging.Filter):
    """Stamp every record with the worker's id."""

    def __init__(self, worker_id):
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record):
        record.worker = self.worker_id
        return True


def configure(worker_id, level="INFO"):
    """Send every log record to stdout as a JSON line (supervisord rotates the files)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OrjsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(worker)s",
        rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"}))
    handler.addFilter(WorkerFilter(worker_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Each record would otherwise ask for the current thread, and under gevent every greenlet
    # that logs gets a dummy Thread object kept for its lifetime: ~1 KB per connection.
    logging.logThreads = False
    # Nor look up the caller's frame, process and process name, which no line shows
    # (the logging HOWTO's "Optimization" switches).
    logging._srcfile = None
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("geventwebsocket.handler").setLevel(logging.WARNING)
