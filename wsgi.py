"""Entry point of a worker: gevent's monkey-patching first, then the app.

`application` serves any gevent WSGI server; `main` is `scalechat-worker`.
"""
from gevent import config, monkey

# Greenlets would otherwise each keep the stack of whoever spawned them, for debugging only:
# a few KB per connection.
config.track_greenlet_tree = False
monkey.patch_all()

import sys  # noqa: E402

from flask_app import create_app, create_application, drain, start_background  # noqa: E402
from flask_app.config import ConfigError  # noqa: E402

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"scalechat: {exc}")
application = create_application(app)


def main(argv=None):
    """Serve this worker until SIGTERM or SIGINT."""
    from flask_app import worker
    worker.run(application, app.config["SCALECHAT"], lambda: start_background(app),
               lambda: drain(app), argv)
