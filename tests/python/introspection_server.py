#!/usr/bin/env python3
"""An OAuth 2.0 token introspection endpoint (RFC 7662) for tests.

Usage: introspection_server.py CONFIG.json PORT_FILE REQUEST_LOG

CONFIG.json: {"client": "ID:SECRET", "tokens": {TOKEN: ANSWER_OBJECT}}
Binds 127.0.0.1 on a free port, writes it to PORT_FILE, and logs each
request (Authorization header and form fields) to REQUEST_LOG as JSON
lines. Wrong client credentials get 401; a known token its answer; any
other token {"active": false}.
"""
import base64
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

config_path, port_file, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
with open(config_path) as f:
    CONFIG = json.load(f)
# Requests are served on threads: one line is appended at a time.
LOG_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        auth = self.headers.get("Authorization", "")
        with LOG_LOCK, open(log_path, "a") as log:
            log.write(json.dumps({"authorization": auth, "form": form,
                                  "content_type": self.headers.get("Content-Type")}) + "\n")
        expected = "Basic " + base64.b64encode(CONFIG["client"].encode()).decode()
        if auth != expected:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        token = form.get("token", [""])[0]
        body = json.dumps(CONFIG["tokens"].get(token, {"active": False})).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.replace(port_file + ".tmp", port_file)
server.serve_forever()
