"""The wire: HTTP and WebSocket handling, Engine.IO sockets and the greenlets that run them.

Nothing here knows about chat; these are the seams where scalechat replaces internals of
gevent-websocket, python-engineio and gevent for speed and safety (docs/performance.md).
"""
