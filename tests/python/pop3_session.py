#!/usr/bin/env python3
"""One POP3 session with poplib through Postern, printed as a JSON line.

Usage: pop3_session.py pop3s|stls PORT USER PASSWORD

Logs in (USER/PASS), then STAT, LIST, UIDL, RETR of every message (SHA-256
of each, as the client reassembles it), DELE of the first, QUIT. Postern's
certificate is self-signed: it is not verified here, the Rust side checks
what matters.
"""
import hashlib
import json
import poplib
import ssl
import sys

mode, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if mode == "pop3s":
    pop = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=60)
else:
    pop = poplib.POP3("127.0.0.1", port, timeout=60)
    pop.stls(context=ctx)
caps = pop.capa()
pop.user(user)
pop.pass_(password)
count, size = pop.stat()
listed = pop.list()[1]
uidls = pop.uidl()[1]
digests = []
for i in range(1, count + 1):
    lines = pop.retr(i)[1]
    # RFC 1939: the message is the lines with CRLF, dot-stuffing undone.
    digests.append(hashlib.sha256(b"\r\n".join(lines) + b"\r\n").hexdigest())
dele = pop.dele(1).decode() if count else ""
quit_answer = pop.quit().decode()
print(json.dumps({
    "capa": sorted(caps),
    "count": count,
    "size": size,
    "listed": len(listed),
    "uidls": len(uidls),
    "sha256": digests,
    "dele": dele,
    "quit": quit_answer,
}))
