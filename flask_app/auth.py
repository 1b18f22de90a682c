"""Who a request or a connection belongs to: site tokens, guest tokens and the Flask session.

A user is an id and a display name. Users of the site that embeds scalechat arrive with a
JWT its backend signed (`sub` is the id); guests sign in under a name and get a random id.
"""
import base64
import binascii
import dataclasses
import hashlib
import secrets
import unicodedata

import itsdangerous
import jwt
import orjson
from flask import current_app, request, session
from flask.sessions import SecureCookieSessionInterface
from itsdangerous.encoding import base64_encode

from . import jsonio

GUEST_PREFIX = "guest:"
MAX_ID = 128
MAX_NAME = 64


@dataclasses.dataclass(frozen=True)
class User:
    """One person: messages, presence and dedup follow the id; the name is only shown."""

    id: str
    name: str


class Unauthorized(Exception):
    """A credential that names nobody; `detail` tells its holder why."""

    def __init__(self, detail):
        super().__init__(detail)
        self.detail = detail


def new_guest(name):
    """Return a guest of its own under `name`: two guests named alike are two users."""
    return User(GUEST_PREFIX + secrets.token_urlsafe(16), name)


def legacy_guest(credential, name):
    """Return the guest a credential issued before users had ids names, one per credential."""
    digest = hashlib.sha256(credential.encode()).digest()[:16]
    return User(GUEST_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode(), name)


class TokenSerializer(itsdangerous.URLSafeTimedSerializer):
    """itsdangerous' URL-safe timed tokens, without trying zlib on a payload too short for it.

    The tokens are the same bytes (compact JSON, base64, timestamp, HMAC), so a worker of
    either kind reads the other's; only the zlib attempt on each issue is skipped.
    """

    def dump_payload(self, obj):
        return base64_encode(orjson.dumps(obj))


class GuestTokens:
    """Signed, expiring tokens naming a guest, for clients that are not browsers."""

    def __init__(self, secret_key, ttl_seconds):
        self.serializer = TokenSerializer(secret_key, salt="scalechat.token", serializer=jsonio)
        self.ttl = ttl_seconds

    def issue(self, user):
        """Return a token for the guest `user`."""
        return self.serializer.dumps({"user": user.name, "id": user.id})

    def verify(self, token):
        """Return the guest a valid, unexpired token names."""
        try:
            data = self.serializer.loads(token, max_age=self.ttl)
        except itsdangerous.SignatureExpired:
            raise Unauthorized("the token has expired: ask for a new one") from None
        except itsdangerous.BadData:
            raise Unauthorized("the token is not valid") from None
        name = data.get("user") if isinstance(data, dict) else None
        if not isinstance(name, str):
            raise Unauthorized("the token is not valid")
        user_id = data.get("id")
        return User(user_id, name) if isinstance(user_id, str) else legacy_guest(token, name)


# What each refusal of PyJWT means to the site developer who minted the token.
JWT_REFUSALS = [
    (jwt.ExpiredSignatureError, "the token has expired: mint a new one"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "the token's aud is not this chat's SCALECHAT_JWT_AUDIENCE"),
    (jwt.InvalidIssuerError, "the token's iss is not this chat's SCALECHAT_JWT_ISSUER"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.exceptions.InvalidSubjectError, "the token's sub must be a string"),
]


class SiteTokens:
    """JWTs the embedding site's backend signs: HS* with a shared secret, RS*/PS*/ES* with a key."""

    def __init__(self, config):
        self.algorithms = config.jwt_algorithms
        self.secret = config.jwt_secret
        self.public_key = config.public_key()
        self.audience = config.jwt_audience or None
        self.issuer = config.jwt_issuer or None
        self.leeway = config.jwt_leeway

    def verify(self, token, header):
        """Return the user a valid site token names."""
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthorized(f"the token's algorithm {alg!r} is not accepted here "
                               f"(accepted: {', '.join(self.algorithms)})")
        # the key follows the algorithm, never the other way: a public key is no HMAC secret
        key = self.secret if alg.startswith("HS") else self.public_key
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None})
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token lacks the {exc.claim} claim") from None
        except jwt.InvalidTokenError as exc:
            detail = next((text for kind, text in JWT_REFUSALS if isinstance(exc, kind)),
                          "the token is malformed")
            raise Unauthorized(detail) from None
        user_id = claim_text(claims, "sub", MAX_ID)
        return User(user_id, claim_text(claims, "name", MAX_NAME) if "name" in claims else user_id)


def claim_text(claims, claim, max_length):
    """Return a claim that is printable text of 1 to `max_length` characters."""
    value = claims[claim]
    if isinstance(value, str):
        value = value.strip()
    if (not isinstance(value, str) or not 1 <= len(value) <= max_length
            or any(unicodedata.category(char) == "Cc" for char in value)):
        raise Unauthorized(f"the token's {claim} must be 1-{max_length} characters "
                           "of text without control characters")
    return value


def jwt_header(token):
    """Return the header of a token shaped like a JWT, else None (a guest token has none)."""
    head = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (binascii.Error, ValueError):
        return None
    return header if isinstance(header, dict) and "alg" in header else None


class Tokens:
    """Every token a client may present: the site's JWTs and, where allowed, guest tokens."""

    def __init__(self, config):
        self.guests = GuestTokens(config.secret_key, config.token_ttl)
        self.site = SiteTokens(config) if config.jwt_algorithms else None
        self.guest_login = config.guest_login

    def issue(self, user):
        """Return a guest token for `user`."""
        return self.guests.issue(user)

    def verify(self, token):
        """Return the user a token names."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("the token must be a non-empty string")
        header = jwt_header(token)
        if header is not None:
            if self.site is None:
                raise Unauthorized("this chat accepts no site tokens: "
                                   "no SCALECHAT_JWT_SECRET or SCALECHAT_JWT_PUBLIC_KEY is set")
            return self.site.verify(token, header)
        self.require_guest_login()
        return self.guests.verify(token)

    def require_guest_login(self):
        """Refuse guests where only the site's users may chat."""
        if not self.guest_login:
            raise Unauthorized("guest sign-in is off: connect with a token from the site")


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


def sign_in(user):
    """Keep a browser signed in as `user` (the name under `user`, as before ids existed)."""
    session["user"] = user.name
    session["user_id"] = user.id


def session_user(tokens):
    """Return the guest the session cookie names, or None; refuse it while guests are off."""
    name, user_id = session.get("user"), session.get("user_id")
    if not isinstance(name, str):
        return None
    tokens.require_guest_login()
    if not isinstance(user_id, str):  # a session from before ids: one guest per cookie
        cookie = request.cookies.get(current_app.config["SESSION_COOKIE_NAME"], "")
        user_id = session["user_id"] = legacy_guest(cookie, name).id
    return User(user_id, name)


def bearer_token(authorization):
    """Return the token of an `Authorization: Bearer` header value, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def request_user(tokens):
    """Return the user of the HTTP request: bearer token first, then the session."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is not None:
        return tokens.verify(token)
    user = session_user(tokens)
    if user is None:
        raise Unauthorized("send Authorization: Bearer <token> or sign in")
    return user


def connect_user(app, tokens, environ, auth):
    """Return the user of a Socket.IO connect: `auth.token` first, then the session cookie."""
    if isinstance(auth, dict) and "token" in auth:
        return tokens.verify(auth["token"])
    with app.request_context(environ):
        user = session_user(tokens)
    if user is None:
        raise Unauthorized('send auth {"token": ...} or sign in')
    return user
