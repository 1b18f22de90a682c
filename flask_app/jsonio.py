"""orjson behind the `dumps`/`loads` interface python-socketio and python-engineio call."""
import orjson


def dumps(obj, **kwargs):
    """Encode to a str; python-socketio's formatting arguments are moot for orjson."""
    return orjson.dumps(obj).decode()


def loads(data, **kwargs):
    """Decode JSON text or bytes."""
    return orjson.loads(data)
