#!/usr/bin/env python3
"""An imaplib session through Postern that may turn COMPRESS=DEFLATE on
(RFC 4978, done by hand with zlib's raw deflate), then waits for the
session to be ended by someone else and reports what the end looked like.

Usage: compress_session.py WHAT COMPRESS PORT USER PASSWORD
  WHAT: idle  — SELECT INBOX, IDLE, print "ready", read to the end;
        fetch — SELECT INBOX, FETCH 1 BODY.PEEK[], read the literal's first
                MiB, print "ready", wait for a line on stdin, read on to
                the end (a small receive buffer keeps Postern mid-literal).
  COMPRESS: 1 to send COMPRESS DEFLATE after login, 0 not to.

After "ready" the test ends the session (kick, shutdown, backend killed).
The script then reads until the server closes and prints one JSON object:
  clean:     every byte inflated without error and nothing followed the
             deflate data (always true without COMPRESS);
  after:     the lines read after "ready" that are not literal data;
  literal:   for fetch: its announced size, the bytes received, whether
             it was complete, and the SHA-256 of the bytes received.
"""
import hashlib
import imaplib
import json
import re
import socket
import ssl
import sys
import zlib

what, compress, port, user, password = (
    sys.argv[1],
    sys.argv[2] == "1",
    int(sys.argv[3]),
    sys.argv[4],
    sys.argv[5],
)
TIMEOUT = 60
# imaplib knows no COMPRESS; it is valid once authenticated (RFC 4978).
imaplib.Commands["COMPRESS"] = ("AUTH", "SELECTED")


class Session(imaplib.IMAP4_SSL):
    """imaplib with its transport wrapped in raw deflate once asked."""

    inflate = None
    deflate = None
    pending = b""
    error = None

    def _create_socket(self, timeout):
        # A small receive buffer: the proxy cannot push a whole 10 MiB
        # message into the kernel while the script is not reading.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(timeout)
        sock.connect((self.host, self.port))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)

    def start_compress(self):
        typ, data = self._simple_command("COMPRESS", "DEFLATE")
        if typ != "OK":
            sys.exit(f"COMPRESS refused: {typ} {data}")
        self.inflate = zlib.decompressobj(-15)
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)

    def _fill(self):
        raw = self.sock.recv(65536)
        if not raw:
            return False
        if self.inflate is None:
            self.pending += raw
            return True
        try:
            self.pending += self.inflate.decompress(raw)
            if self.inflate.unused_data:
                self.error = "bytes after the end of the deflate stream"
        except zlib.error as e:
            self.error = f"inflate: {e}"
            return False
        return True

    def read(self, size):
        if self.inflate is None and not self.pending:
            return super().read(size)
        while len(self.pending) < size:
            if not self._fill():
                break
        out, self.pending = self.pending[:size], self.pending[size:]
        return out

    def readline(self):
        if self.inflate is None and not self.pending:
            return super().readline()
        while b"\n" not in self.pending:
            if not self._fill():
                out, self.pending = self.pending, b""
                return out
        at = self.pending.index(b"\n") + 1
        out, self.pending = self.pending[:at], self.pending[at:]
        return out

    def send(self, data):
        if self.deflate is None:
            return super().send(data)
        self.sock.sendall(self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH))


def context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def rest_lines(imap):
    lines = []
    while True:
        try:
            line = imap.readline()
        except (OSError, ssl.SSLError) as e:
            lines.append(f"<{type(e).__name__}>")
            break
        if not line:
            break
        lines.append(line.decode("latin-1").rstrip("\r\n"))
    return lines


imap = Session("127.0.0.1", port, ssl_context=context(), timeout=TIMEOUT)
imap.login(user, password)
if compress:
    imap.start_compress()
typ, _ = imap.select("INBOX")
assert typ == "OK", typ
report = {"compressed": compress}
if what == "idle":
    imap.send(b"I1 IDLE\r\n")
    line = imap.readline()
    assert line.startswith(b"+"), line
    print("ready", flush=True)
    report["after"] = rest_lines(imap)
elif what == "fetch":
    imap.send(b"F1 FETCH 1 BODY.PEEK[]\r\n")
    head = imap.readline()
    m = re.search(rb"\{(\d+)\}\r\n$", head)
    assert m, head
    size = int(m.group(1))
    got = imap.read(1 << 20)
    print("ready", flush=True)
    sys.stdin.readline()
    digest = hashlib.sha256(got)
    received = len(got)
    while received < size:
        try:
            piece = imap.read(min(65536, size - received))
        except (OSError, ssl.SSLError):
            break
        if not piece:
            break
        digest.update(piece)
        received += len(piece)
    report["literal"] = {
        "size": size,
        "received": received,
        "complete": received == size,
        "sha256": digest.hexdigest(),
    }
    report["after"] = rest_lines(imap)
else:
    sys.exit(f"unknown WHAT {what}")
report["clean"] = imap.error is None
report["error"] = imap.error
print(json.dumps(report), flush=True)
