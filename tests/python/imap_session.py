#!/usr/bin/env python3
"""A real client session through Postern with Python's imaplib.

Usage: imap_session.py MODE PORT USER PASSWORD
  MODE: imaps (implicit TLS) or starttls

Logs in, selects INBOX, appends a message, fetches it back, sets a flag,
runs IDLE until the server reports a new message (appended over a second
connection) and ends it with DONE, then logs out. Prints one JSON object
with what it saw; exits non-zero on any protocol failure.
"""
import imaplib
import json
import socket
import ssl
import sys
import time

mode, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# Generous for a loaded machine, and above the 30 s in which Dovecot checks
# an IDLE mailbox when it cannot watch it (inotify limits).
TIMEOUT = 60


def context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect():
    if mode == "imaps":
        imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context(), timeout=TIMEOUT)
    elif mode == "starttls":
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)
        imap.starttls(ssl_context=context())
    else:
        sys.exit(f"unknown mode {mode}")
    return imap


def check(result, what):
    typ, data = result
    if typ != "OK":
        sys.exit(f"{what} failed: {typ} {data}")
    return data


out = {}
imap = connect()
out["greeting"] = imap.welcome.decode()
out["capabilities_before_login"] = sorted(imap.capabilities)
out["login_response"] = check(imap.login(user, password), "LOGIN")[0].decode()
out["capabilities_after_login"] = check(imap.capability(), "CAPABILITY")[0].decode()
count = int(check(imap.select("INBOX"), "SELECT")[0])
subject = f"through postern {time.time()}"
message = f"From: a@example.com\r\nTo: {user}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
check(imap.append("INBOX", None, None, message), "APPEND")
count = int(check(imap.select("INBOX"), "SELECT")[0])
data = check(imap.fetch(str(count), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), "FETCH")
out["fetched_subject"] = data[0][1].decode().strip()
check(imap.store(str(count), "+FLAGS", "(\\Flagged)"), "STORE")
data = check(imap.fetch(str(count), "(FLAGS)"), "FETCH FLAGS")
out["flags"] = data[0].decode()

# IDLE by hand (imaplib gained idle() only in 3.14).
tag = imap._new_tag().decode()
imap.send(f"{tag} IDLE\r\n".encode())
out["idle_continuation"] = imap.readline().decode().strip()
other = connect()
check(other.login(user, password), "second LOGIN")
check(other.append("INBOX", None, None, message), "second APPEND")
other.logout()
# The first untagged line need not be the EXISTS (RECENT, FETCH, ...).
while True:
    line = imap.readline().decode().strip()
    if not line:
        sys.exit("connection closed in IDLE")
    if line.endswith("EXISTS"):
        out["idle_update"] = line
        break
imap.send(b"DONE\r\n")
while True:
    line = imap.readline().decode().strip()
    if line.startswith(tag):
        out["idle_done"] = line
        break
imap.logout()
out["ok"] = True
print(json.dumps(out))
