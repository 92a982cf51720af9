#!/usr/bin/env python3
"""One submission with smtplib through Postern.

Usage: smtp_session.py starttls|ssl PORT SOURCE_IP USER PASSWORD PLAIN|LOGIN MESSAGE_FILE

Connects from SOURCE_IP (a loopback address, so the backend's log tells the
client's address from Postern's), says EHLO client.example, upgrades with
STARTTLS (or speaks implicit TLS), logs in with the named mechanism, sends
the file's bytes (CRLF lines, 8-bit) from alice@example.org to
rcpt@example.net with BODY=8BITMIME, and quits. Prints the EHLO keywords
seen before and after login as one JSON line. Postern's certificate is
self-signed: it is not verified here.
"""
import json
import smtplib
import ssl
import sys

mode, port, source, user, password, mechanism, path = sys.argv[1:8]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
kwargs = dict(local_hostname="client.example", source_address=(source, 0), timeout=60)
if mode == "ssl":
    s = smtplib.SMTP_SSL("127.0.0.1", int(port), context=ctx, **kwargs)
    s.ehlo()
    before = sorted(s.esmtp_features)
else:
    s = smtplib.SMTP("127.0.0.1", int(port), **kwargs)
    s.ehlo()
    before = sorted(s.esmtp_features)
    s.starttls(context=ctx)
    s.ehlo()
after_tls = sorted(s.esmtp_features)
s.user, s.password = user, password
if mechanism == "PLAIN":
    s.auth("PLAIN", s.auth_plain)
else:
    s.auth("LOGIN", s.auth_login, initial_response_ok=False)
with open(path, "rb") as f:
    message = f.read()
refused = s.sendmail("alice@example.org", ["rcpt@example.net"], message,
                     mail_options=["BODY=8BITMIME"])
s.quit()
print(json.dumps({"before": before, "after_tls": after_tls, "refused": list(refused)}))
