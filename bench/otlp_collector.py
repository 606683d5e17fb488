"""A stand-in OTLP/HTTP collector for bench/otel.sh.

    python3 bench/otlp_collector.py PORT up       # answers every export 200
    python3 bench/otlp_collector.py PORT silent   # takes connections, never answers

`up` counts the exports and their bytes and prints them on SIGTERM; it does
not decode them (tests/otel.rs does, with opentelemetry-proto).
"""
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
exports = {"n": 0, "bytes": 0}


def report(*_):
    print(f"exports {exports['n']} bytes {exports['bytes']}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, report)

if mode == "silent":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)
else:

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            exports["n"] += 1
            exports["bytes"] += len(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.pause()
