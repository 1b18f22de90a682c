"""scalechat's benchmark harness: run on demand with `python -m bench` (see docs/performance.md)."""
