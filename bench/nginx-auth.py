#!/usr/bin/env python3
"""The auth_http endpoint nginx's mail proxy asks before every login.

Usage: nginx-auth.py LISTEN_PORT [PROTOCOL:]BACKEND_PORT...

Each backend port is given for one protocol, `imap:PORT` or `pop3:PORT` (a
bare PORT is IMAP), in the same backend order for every protocol. Answers
every request with Auth-Status OK and a backend on 127.0.0.1 picked by a
stable hash (CRC-32) of the user name, so a user always lands on the same
backend, at that backend's port for the request's Auth-Protocol. It checks
no password: the backend does, as with HAProxy.
"""
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AuthHandler(BaseHTTPRequestHandler):
    # protocol ("imap", "pop3") -> backend ports, in backend order
    backend_ports: dict[str, list[int]] = {}

    def do_GET(self):
        user = self.headers.get("Auth-User", "")
        protocol = self.headers.get("Auth-Protocol", "imap").lower()
        ports = self.backend_ports.get(protocol)
        if not ports:
            # nginx reads this as a refusal and tells the client so; the
            # wait header keeps it from asking again at once.
            self.send_response(200)
            self.send_header("Auth-Status", f"no {protocol} backend")
            self.send_header("Auth-Wait", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        port = ports[zlib.crc32(user.encode()) % len(ports)]
        self.send_response(200)
        self.send_header("Auth-Status", "OK")
        self.send_header("Auth-Server", "127.0.0.1")
        self.send_header("Auth-Port", str(port))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        # A line per login would cost more than the answer itself.
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connections when nginx opens a burst.
    request_queue_size = 512


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for arg in sys.argv[2:]:
        protocol, _, port = arg.rpartition(":")
        AuthHandler.backend_ports.setdefault(protocol or "imap", []).append(int(port))
    Server(("127.0.0.1", int(sys.argv[1])), AuthHandler).serve_forever()


if __name__ == "__main__":
    main()
