#!/usr/bin/env python3
"""Writes the hand-made seeds of the xenstore-wire target into
Tests/FuzzCorpus/xenstore-wire/ (the program format: docs/FUZZING.md)."""
import os, struct

PATHS = ["", "data", "data/x", "dom0-owned", "readonly", "device/vbd/51712/state",
         "/local/domain/5", "/local/domain/5/data", "/local/domain/5/dom0-owned", "/local/domain/5/readonly",
         "/local/domain/7", "/local/domain/7/secret", "/local/domain/0", "/local/domain", "/",
         "/protected", "/protected/k", "/readable", "/readable/k", "/shared", "/shared/s",
         "/writeonly", "/writeonly/w", "/tool/xenstored", "@introduceDomain", "@releaseDomain", "@bogus",
         "//x", "data/", "bad char!", "LONG-RELATIVE", "LONG-ABSOLUTE"]
P = {p: i for i, p in enumerate(PATHS)}
T = dict(control=0, directory=1, read=2, getPerms=3, watch=4, unwatch=5, transactionStart=6, transactionEnd=7,
         introduce=8, release=9, getDomainPath=10, write=11, mkdir=12, rm=13, setPerms=14, watchEvent=15,
         error=16, isDomainIntroduced=17, resume=18, setTarget=19, resetWatches=21, directoryPart=22)
REPEAT = {1: 0, 2: 4, 16: 5, 200: 6, 1100: 7}
TX = {"none": 0, "last": 1, "next": 3}
DOM0_PATHS = ["/protected/k", "/protected/new", "/local/domain/5/x", "/local/domain/5/dom0-owned",
              "/local/domain/5/data/deep/er", "/local/domain/5", "/shared/s", "/readable/k",
              "/local/domain/7/secret", "/writeonly/w"]

def path(p, suffix=None, nul=True):
    b = bytes([P[p]])
    if suffix is None: b += bytes([0])
    elif suffix == "indexed": b += bytes([1])
    else: b += bytes([2, len(suffix)]) + bytes(ord(c) - ord("a") for c in suffix)
    return b + bytes([1 if nul else 0])

def req(type_, fields=b"", reqid=1, tx="none", repeat=1):
    return bytes([1, T[type_]]) + struct.pack("<I", reqid) + bytes([TX[tx], REPEAT[repeat]]) + fields

def raw(data): return bytes([0]) + struct.pack("<H", len(data)) + data
def header(type_, reqid, tx, length): return struct.pack("<IIII", type_, reqid, tx, length)
def dom0_write(p, value): return bytes([2, 0, DOM0_PATHS.index(p), len(value)]) + value
def dom0_rm(p): return bytes([2, 1, DOM0_PATHS.index(p)])
def dom0_perms(p, index): return bytes([2, 2, DOM0_PATHS.index(p), index])
TOGGLE_READING, RECONNECT = bytes([3]), bytes([4])
VALUE = {0: 0, 1: 1, 8: 2, 100: 3, 2047: 4, 2048: 5, 2049: 6, 4000: 7}
def value(size, fill=ord("v")): return bytes([VALUE[size], fill])

seeds = {
    "basic-requests": req("write", path("data/x") + value(8)) + req("read", path("data/x"), 2)
        + req("directory", path(""), 3) + req("getPerms", path("data/x"), 4) + req("mkdir", path("device/vbd/51712/state"), 5)
        + req("rm", path("data"), 6) + req("getDomainPath", bytes([0]), 7),
    "others-nodes": req("read", path("/protected/k")) + req("read", path("/local/domain/7/secret"), 2)
        + req("directory", path("/protected"), 3) + req("getPerms", path("/writeonly/w"), 4)
        + req("write", path("/protected/k") + value(1), 5) + req("rm", path("/local/domain/5/dom0-owned"), 6)
        + req("setPerms", path("/readable/k") + bytes([2, 3]), 7) + req("write", path("/writeonly/w") + value(1), 8)
        + req("rm", path("/local/domain/5"), 9) + req("write", path("readonly") + value(1), 10),
    "permissions": req("write", path("data") + value(1)) + req("setPerms", path("data") + bytes([2, 0, 6]), 2)
        + req("setPerms", path("data") + bytes([1, 4]), 3) + req("setPerms", path("data") + bytes([1, 9]), 4)
        + req("getPerms", path("data"), 5) + dom0_perms("/readable/k", 0) + req("read", path("/readable/k"), 6)
        + dom0_perms("/protected/k", 2) + req("read", path("/protected/k"), 7),
    "transactions": req("transactionStart", bytes([1])) + req("write", path("data/x") + value(8), 2, "last")
        + req("read", path("data/x"), 3, "last") + req("transactionEnd", bytes([0]), 4, "last")
        + req("transactionStart", bytes([1]), 5) + req("write", path("data/x", "indexed") + value(1), 6, "last", 16)
        + dom0_write("/local/domain/5/x", b"conflict") + req("directory", path(""), 7, "last")
        + req("transactionEnd", bytes([0]), 8, "last") + req("transactionStart", bytes([1]), 9, repeat=16)
        + req("transactionEnd", bytes([2]), 10, "last") + req("read", path("data"), 11, "next"),
    "watches": req("watch", path("") + bytes([0])) + dom0_write("/local/domain/5/x", b"1")
        + dom0_write("/protected/k", b"2") + req("watch", path("/protected") + bytes([1]), 2)
        + dom0_rm("/protected/k") + req("watch", path("@introduceDomain") + bytes([0]), 3)
        + req("unwatch", path("") + bytes([0]), 4) + req("watch", path("data", "indexed") + bytes([3]), 5, repeat=200)
        + req("resetWatches", b"", 6),
    # About 370 children fill a directory's 2048 bytes; three directories pass 1000 nodes.
    "quotas": req("write", path("data", "indexed") + value(1), 1, repeat=1100)
        + req("mkdir", path("data/x", "indexed"), 1200, repeat=1100)
        + req("mkdir", path("device/vbd/51712/state", "indexed"), 2400, repeat=1100)
        + req("write", path("data/x") + value(2049), 2)
        + req("write", path("data/x") + value(2048), 3) + req("mkdir", path("data", "abcdefgh"), 4),
    "privileged-and-unknown": req("introduce", bytes([0])) + req("release", bytes([0]), 2) + req("setTarget", bytes([0, 1]), 3)
        + req("resume", bytes([0]), 4) + req("control", bytes([0]), 5) + req("isDomainIntroduced", bytes([0]), 6)
        + req("watchEvent", bytes([2]) + b"x\0", 7) + bytes([1, 23]) + struct.pack("<IIBB", 999, 8, 0, 0) + bytes([0]),
    "bad-framing": raw(header(2, 1, 0, 4)[:10]) + raw(header(2, 1, 0, 4)[10:] + b"data") + raw(header(2, 2, 0, 3) + b"abc")
        + raw(header(2, 3, 0, 5000)) + req("read", path("data"), 4) + RECONNECT + req("read", path("LONG-ABSOLUTE"), 5)
        + req("write", path("LONG-RELATIVE") + value(4000), 6),
    "not-reading": TOGGLE_READING + req("directory", path("/local/domain/5"), 1, repeat=200) + TOGGLE_READING
        + req("read", path("readonly"), 2),
    "directory-part": req("write", path("data", "indexed") + value(0), 1, repeat=200)
        + req("directoryPart", path("data") + bytes([0]), 2) + req("directoryPart", path("data") + bytes([3]), 3)
        + req("directoryPart", path("/protected") + bytes([0]), 4) + req("directoryPart", path("data") + bytes([4]), 5),
}
# Hand-written regression inputs for what the fuzzer's invariants did not
# cover at first (named for what they found; the fuzzer's own are copied in).
findings = {
    # Before the 1024-node transaction quota its read set grew with every distinct path.
    "transaction-touching-unbounded-nodes": req("transactionStart", bytes([1]))
        + req("read", path("data", "indexed"), 2, "last", 1100) + req("read", path("data/x", "indexed"), 3, "last", 1100),
}
folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xenstore-wire")
for name, data in seeds.items():
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
for name, data in findings.items():
    with open(os.path.join(folder, "findings", name), "wb") as f:
        f.write(data)
