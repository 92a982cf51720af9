#!/usr/bin/env python3
"""An authentication service speaking nginx's auth_http protocol, for tests.

Usage: auth_http_server.py CONFIG.json PORT_FILE REQUEST_LOG

CONFIG.json: {"users": {NAME: {"password": P, "server": IP, "port": N,
              "user": BACKEND_USER?, "pass": BACKEND_PASS?}},
              "nowait": [NAME, ...], "hang": [NAME, ...], "error": [NAME, ...],
              "wait": SECONDS, "bind_port": N?}
Binds 127.0.0.1 on bind_port (default: a free port), writes the port to PORT_FILE, and appends
each request's headers, as received, to REQUEST_LOG (one JSON object a
line). Auth-User and Auth-Pass are %XX-decoded as nginx's peers do. A good
password gets Auth-Status OK with Auth-Server/Auth-Port (and Auth-User /
Auth-Pass when configured); a bad one "Invalid login or password" with
Auth-Wait, except for users in "nowait". Users in "hang" get no answer for
60 s; users in "error" get a 500. Answers are HTTP/1.0, then the
connection closes, as nginx expects.
"""
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

config_path, port_file, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
with open(config_path) as f:
    CONFIG = json.load(f)
LOG_LOCK = threading.Lock()


def decode(value):
    return urllib.parse.unquote_to_bytes(value or "").decode("utf-8", "surrogateescape")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def answer(self, code, headers):
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        headers = {k: v for k, v in self.headers.items()}
        with LOG_LOCK, open(log_path, "a") as log:
            log.write(json.dumps({"path": self.path, "headers": headers}) + "\n")
        user = decode(self.headers.get("Auth-User"))
        password = decode(self.headers.get("Auth-Pass"))
        if user in CONFIG.get("hang", []):
            time.sleep(60)
            return
        if user in CONFIG.get("error", []):
            self.answer(500, {})
            return
        entry = CONFIG["users"].get(user)
        if entry is not None and entry["password"] == password:
            reply = {
                "Auth-Status": "OK",
                "Auth-Server": entry["server"],
                "Auth-Port": str(entry["port"]),
            }
            if "user" in entry:
                reply["Auth-User"] = entry["user"]
            if "pass" in entry:
                reply["Auth-Pass"] = entry["pass"]
            self.answer(200, reply)
            return
        reply = {"Auth-Status": "Invalid login or password"}
        if user not in CONFIG.get("nowait", []):
            reply["Auth-Wait"] = str(CONFIG.get("wait", 1))
        self.answer(200, reply)


server = ThreadingHTTPServer(("127.0.0.1", CONFIG.get("bind_port", 0)), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
# Renamed into place, so a reader never sees a partial number.
os.replace(port_file + ".tmp", port_file)
server.serve_forever()
