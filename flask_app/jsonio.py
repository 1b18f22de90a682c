"""JSON through orjson: for python-socketio and python-engineio, and for Flask."""
import orjson
from flask.json.provider import JSONProvider


def dumps(obj, **kwargs):
    """Encode to a str; python-socketio's formatting arguments are moot for orjson."""
    return orjson.dumps(obj).decode()


def loads(data, **kwargs):
    """Decode JSON text or bytes."""
    return orjson.loads(data)


class FlaskJSON(JSONProvider):
    """Flask's `request.get_json` and `jsonify` through orjson (`app.json`)."""

    def dumps(self, obj, **kwargs):
        return dumps(obj)

    def loads(self, s, **kwargs):
        return orjson.loads(s)
