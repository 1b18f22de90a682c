"""Who a request or a connection belongs to: signed tokens and the Flask session."""
import itsdangerous
import orjson
from flask import session
from flask.sessions import SecureCookieSessionInterface
from itsdangerous.encoding import base64_encode

from . import jsonio


class TokenSerializer(itsdangerous.URLSafeTimedSerializer):
    """itsdangerous' URL-safe timed tokens, without trying zlib on a payload too short for it.

    The tokens are the same bytes (compact JSON, base64, timestamp, HMAC), so a worker of
    either kind reads the other's; only the zlib attempt on each issue is skipped.
    """

    def dump_payload(self, obj):
        return base64_encode(orjson.dumps(obj))


class Tokens:
    """Signed, expiring tokens naming a user, for clients that are not browsers."""

    def __init__(self, secret_key, ttl_seconds):
        self.serializer = TokenSerializer(secret_key, salt="scalechat.token", serializer=jsonio)
        self.ttl = ttl_seconds

    def issue(self, user):
        """Return a token for `user`."""
        return self.serializer.dumps({"user": user})

    def verify(self, token):
        """Return the user a valid, unexpired token names, else None."""
        if not isinstance(token, str):
            return None
        try:
            data = self.serializer.loads(token, max_age=self.ttl)
        except itsdangerous.BadData:
            return None
        user = data.get("user") if isinstance(data, dict) else None
        return user if isinstance(user, str) else None


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, with its signer built once instead of per request.

    A request without cookies (API clients, a first visit) gets an empty session without
    parsing any: most requests to a chat worker are those.
    """

    signer = None

    def open_session(self, app, request):
        if "HTTP_COOKIE" not in request.environ:
            return self.session_class()
        return super().open_session(app, request)

    def get_signing_serializer(self, app):
        if self.signer is None:
            self.signer = super().get_signing_serializer(app)
        return self.signer


def bearer_token(authorization):
    """Return the token of an `Authorization: Bearer` header value, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def request_user(tokens, request):
    """Return the user of an HTTP request: bearer token first, then the session."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is not None:
        return tokens.verify(token)
    return session.get("user")


def connect_user(app, tokens, environ, auth):
    """Return the user of a Socket.IO connect: `auth.token` first, then the session cookie."""
    if isinstance(auth, dict) and "token" in auth:
        return tokens.verify(auth["token"])
    with app.request_context(environ):
        user = session.get("user")
    return user if isinstance(user, str) else None
