#!/usr/bin/env python3
"""dom0's end of the domU's TCP check (scripts/xenlab/dom0-test).

Listens on ADDRESS:PORT for one connection; reads until the peer shuts its
side (busybox nc does at the end of its stdin), then sends SIZE random bytes
and closes. Prints "received N bytes md5 H in S s" and "sent N bytes md5 H".
Gives up after LIMIT seconds.

usage: tcp-peer.py ADDRESS PORT SIZE LIMIT
"""
import hashlib
import os
import socket
import sys
import time

address, port, size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
server = socket.create_server((address, port))
server.settimeout(limit)
conn, peer = server.accept()
conn.settimeout(limit)
print(f"connection from {peer[0]}:{peer[1]}", flush=True)
t0 = time.monotonic()
digest, received = hashlib.md5(), 0
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    digest.update(chunk)
    received += len(chunk)
elapsed = time.monotonic() - t0
print(f"received {received} bytes md5 {digest.hexdigest()} in {elapsed:.1f} s", flush=True)
payload = os.urandom(size)
t0 = time.monotonic()
conn.sendall(payload)
conn.shutdown(socket.SHUT_WR)
# Wait for the peer to close, so that every byte has been taken.
while conn.recv(1 << 16):
    pass
conn.close()
print(f"sent {size} bytes md5 {hashlib.md5(payload).hexdigest()} in {time.monotonic() - t0:.1f} s", flush=True)
