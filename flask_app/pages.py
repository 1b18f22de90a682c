"""The browser pages: the lobby with its sign-in form, and a room."""
from pathlib import Path

from flask import (Blueprint, abort, redirect, render_template, request,
                   send_from_directory, session, url_for)

from . import auth, validation
from .api import room_list
from .services import get_services

bp = Blueprint("pages", __name__)

# Scripts only from this origin (the pages have no inline script), sockets to it too.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def add_security_headers(response):
    """Give every Flask response the headers that keep the pages to themselves."""
    response.headers.update(SECURITY_HEADERS)
    return response


def browser_user():
    """Return the guest this browser signed in as, or None (also once guests are turned off)."""
    try:
        return auth.session_user(get_services().tokens)
    except auth.Unauthorized:
        return None


@bp.get("/")
def lobby():
    """Show the sign-in form, or the rooms with their online counts."""
    user = browser_user()
    rooms = room_list(get_services()) if user else []
    return render_template("lobby.html", user=user, rooms=rooms,
                           guest_login=get_services().tokens.guest_login,
                           next=request.args.get("next", ""))


@bp.post("/login")
def login():
    """Sign a browser in as a new guest under a display name, kept in the session cookie."""
    if not get_services().tokens.guest_login:
        return render_template("lobby.html", user=None, rooms=[], guest_login=False), 403
    try:
        name = validation.name(request.form.get("name"))
    except validation.ValidationError as exc:
        return render_template("lobby.html", user=None, rooms=[], error=exc.detail,
                               guest_login=True, next=request.form.get("next", "")), 400
    auth.sign_in(auth.new_guest(name))
    target = request.form.get("next", "")
    return redirect(target if target.startswith("/rooms/") else url_for("pages.lobby"))


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("pages.lobby"))


@bp.post("/rooms")
def open_room():
    """Go to the room named in the lobby's form, creating it on first join."""
    try:
        room = validation.room(request.form.get("room", "").strip().lower())
    except validation.ValidationError as exc:
        return render_template("lobby.html", user=browser_user(),
                               rooms=room_list(get_services()), error=exc.detail), 400
    return redirect(url_for("pages.room", room=room))


@bp.get("/rooms/<room>")
def room(room):
    """Show a room; its messages and members arrive over Socket.IO."""
    try:
        room = validation.room(room)
    except validation.ValidationError as exc:
        abort(404, exc.detail)
    user = browser_user()
    if user is None:
        return redirect(url_for("pages.lobby", next=request.path))
    return render_template("room.html", user=user, room=room,
                           max_text=get_services().config.max_text)


@bp.get("/vendor/socket.io.min.js")
def socketio_client():
    """Serve the official socket.io-client installed from npm."""
    dist = Path(get_services().config.node_modules) / "socket.io-client" / "dist"
    if not (dist / "socket.io.min.js").is_file():
        abort(404, "socket.io-client is not installed: run `npm ci` in the project root")
    return send_from_directory(dist, "socket.io.min.js", mimetype="text/javascript")
