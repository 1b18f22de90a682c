"""Who a request or a connection belongs to: signed tokens and the Flask session."""
import itsdangerous
from flask import session
from flask.sessions import SecureCookieSessionInterface


class Tokens:
    """Signed, expiring tokens naming a user, for clients that are not browsers."""

    def __init__(self, secret_key, ttl_seconds):
        self.serializer = itsdangerous.URLSafeTimedSerializer(
            secret_key, salt="scalechat.token")
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
    """Flask's signed-cookie session, with its signer built once instead of per request."""

    signer = None

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
