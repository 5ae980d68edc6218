"""The live web view of a run (`ksm-proto run --web`, `ksm-proto trace view FILE`).

Owns the local HTTP server (loopback, token, JSON deltas over Server-Sent Events), the two
sources it shows (a live Machine read through shared memory, a recorded trace replayed) and the
static page (static/index.html, static/app.js: plain JS and canvas, no build step).
"""
from workers.tools.web.server import LiveSource, ReplaySource, WebServer, serve

__all__ = ["LiveSource", "ReplaySource", "WebServer", "serve"]
