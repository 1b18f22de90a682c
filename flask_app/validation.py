"""Checks of everything a client sends, each refusal with a stable error code."""
import re

from .auth import MAX_ID

ROOM_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
NAME_PATTERN = re.compile(r"[\w][\w .'-]{0,31}")
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
STREAM_ID_PATTERN = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
MAX_ID_PART = 2**64 - 1


class ValidationError(ValueError):
    """Bad input from a client: `code` is stable, `detail` is for people."""

    def __init__(self, code, detail):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def payload(data):
    """Return the event payload if it is a JSON object."""
    if not isinstance(data, dict):
        raise ValidationError("invalid_payload", "the payload must be a JSON object")
    return data


def room(value):
    """Return a room name: 1-64 of a-z, 0-9, '-' and '_', starting with a letter or digit."""
    if not isinstance(value, str) or not ROOM_PATTERN.fullmatch(value):
        raise ValidationError(
            "invalid_room",
            "room must be 1-64 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit")
    return value


def name(value):
    """Return a display name: 1-32 letters, digits, spaces or . ' - _, trimmed."""
    if isinstance(value, str):
        value = value.strip()
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValidationError(
            "invalid_name",
            "name must be 1-32 letters, digits, spaces or . ' - _, "
            "starting with a letter or digit")
    return value


def text(value, max_length):
    """Return message text: a non-blank string of at most `max_length` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("invalid_text", "text must be a non-empty string")
    if len(value) > max_length:
        raise ValidationError(
            "text_too_long", f"text must be at most {max_length} characters")
    if "\x00" in value:
        raise ValidationError("invalid_text", "text must not contain NUL characters")
    return value


def client_id(value):
    """Return the client's own message id, used to deduplicate retries."""
    if not isinstance(value, str) or not CLIENT_ID_PATTERN.fullmatch(value):
        raise ValidationError(
            "invalid_client_id",
            "client_id must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'")
    return value


def cursor(value, field):
    """Return an optional message id used as an exclusive bound of a history page.

    Both parts of a stream id are 64-bit: Redis would refuse a larger one as an error of its own.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not STREAM_ID_PATTERN.fullmatch(value) \
            or any(int(part) > MAX_ID_PART for part in value.split("-")):
        raise ValidationError(
            "invalid_cursor", f"{field} must be a message id such as '1700000000000-0'")
    return value


def user_cursor(value):
    """Return an optional user id after which a page of members starts."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID \
            or "\x1f" in value:
        raise ValidationError("invalid_cursor",
                              "after must be the id of the last user of the previous page")
    return value


def limit(value, default, maximum):
    """Return a page size between 1 and `maximum`."""
    if value is None:
        return default
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValidationError(
            "invalid_limit", f"limit must be an integer from 1 to {maximum}")
    return value
