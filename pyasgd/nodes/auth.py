"""The join token (--rdzv-token, or PYASGD_RDZV_TOKEN): who may join a run across nodes, and
keeping the settings out of node 0's store for anyone who cannot prove the token.

Node 0 publishes a random nonce. A node that wants to join sends HMAC-SHA256(token, nonce, its
rank, its attempt number); node 0 admits it only when that proof is right, and proves the token
back (so a node also refuses an impostor node 0). With a token, nothing readable of the settings
goes through the store: each node publishes, instead of its settings, one HMAC per setting (the
nodes can still name the first setting that differs, but nobody without the token can read or
test a value), and the summaries and stop notes it sends are sealed: encrypted with a SHAKE-256
keystream and authenticated with HMAC-SHA256 (encrypt-then-MAC, a fresh 16-byte nonce each).

What the token does not protect: the servers' gloo traffic (gradients and parameters travel in
the clear, unauthenticated, between the addresses the store lists), the heartbeats (a phase and
counters), and the store itself from a host that floods it. Nodes belong on a private network.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from typing import Any

ENV = "PYASGD_RDZV_TOKEN"
OPEN = "open"  # node 0's auth/mode when it runs without a token


def token() -> bytes | None:
    """This process's join token (pyasgd-train's --rdzv-token sets the variable), or None."""
    value = os.environ.get(ENV, "")
    return value.encode() if value else None


def new_nonce() -> str:
    return secrets.token_hex(16)


def mode_of(nonce: str | None) -> str:
    """What node 0 publishes as auth/mode: the nonce, or OPEN."""
    return f"token:{nonce}" if nonce else OPEN


def nonce_of(mode: str) -> str | None:
    return mode.split(":", 1)[1] if mode.startswith("token:") else None


PBKDF2_ROUNDS = 200_000  # a weak token costs an offline guesser this many HMACs per guess


def derive(token_: bytes, nonce: str) -> bytes:
    """The run's key: PBKDF2-HMAC-SHA256 of the token salted with node 0's nonce (everything the
    protocol puts in the store is readable, so a short token must not be cheap to test offline)."""
    return hashlib.pbkdf2_hmac("sha256", token_, f"pyasgd-rdzv|{nonce}".encode(), PBKDF2_ROUNDS)


def proof(key: bytes, nonce: str, *what: Any) -> str:
    """HMAC-SHA256 of the nonce and `what` under the run's key, hex."""
    msg = "|".join([nonce, *map(str, what)]).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def check(key: bytes, nonce: str, claimed: Any, *what: Any) -> bool:
    """Whether `claimed` (anything read from the store) is the proof of `what`."""
    return isinstance(claimed, str) and hmac.compare_digest(claimed.encode("utf-8", "replace"),
                                                            proof(key, nonce, *what).encode())


def digests(key: bytes, nonce: str, settings: dict[str, Any], rank: int) -> dict[str, str]:
    """One HMAC per setting in place of its value, bound to the node that publishes it: a node
    compares node p's digests with its own values digested for rank p."""
    return {k: proof(key, nonce, "setting", rank, k, json.dumps(v, sort_keys=True)) for k, v in settings.items()}


class Sealer:
    """Seals and opens what the nodes send through the store (summaries, stop notes) under the
    token; without one (an open run) both are the identity."""

    def __init__(self, key: bytes | None, nonce: str | None) -> None:
        self.on = key is not None and nonce is not None
        self.key, self.nonce = key, nonce  # the run's derived key and node 0's nonce
        if self.on:
            self._enc = hmac.new(key, f"{nonce}|seal-enc".encode(), hashlib.sha256).digest()
            self._mac = hmac.new(key, f"{nonce}|seal-mac".encode(), hashlib.sha256).digest()

    def _stream(self, iv: bytes, n: int) -> bytes:
        return hashlib.shake_256(self._enc + iv).digest(n)

    def _tag(self, where: str, iv: bytes, body: bytes) -> bytes:
        return hmac.new(self._mac, where.encode() + b"\0" + iv + body, hashlib.sha256).digest()

    def seal(self, text: str, where: str) -> str:
        """`text` sealed for the store key `where` (it opens there only)."""
        if not self.on:
            return text
        data, iv = text.encode(), secrets.token_bytes(16)
        body = bytes(a ^ b for a, b in zip(data, self._stream(iv, len(data))))
        return "sealed:" + base64.b64encode(iv + self._tag(where, iv, body) + body).decode()

    def open(self, text: str, where: str) -> str | None:
        """The plain text, or None when it is not sealed under this token for the key `where`
        (or was altered)."""
        if not self.on:
            return text
        if not text.startswith("sealed:"):
            return None
        try:
            raw = base64.b64decode(text[len("sealed:"):], validate=True)
        except ValueError:
            return None
        iv, tag, body = raw[:16], raw[16:48], raw[48:]
        if len(raw) < 48 or not hmac.compare_digest(tag, self._tag(where, iv, body)):
            return None
        return bytes(a ^ b for a, b in zip(body, self._stream(iv, len(body)))).decode()


class JoinRefused(Exception):
    """This node may not join (its message says why and what to do); the rendezvous turns it into
    its one-line error."""


def open_sealer(store) -> Sealer:
    """The sealer of a node's server: node 0's nonce from the store, the token from the
    environment (inherited from its launcher). A store that says "no token" to a node that has
    one has been tampered with: refused, never a silent downgrade."""
    mode = store.get("auth/mode").decode() if store.check(["auth/mode"]) else OPEN
    tok, nonce = token(), nonce_of(mode)
    if tok is not None and nonce is None:
        raise JoinRefused("node 0's store says the run has no join token, but this node has one")
    return Sealer(derive(tok, nonce) if tok is not None else None, nonce)


def publish_mode(store, key: bytes | None) -> Sealer:
    """Node 0: say whether the run needs the token (and its nonce). `key`: the token."""
    nonce = new_nonce() if key else None
    store.set("auth/mode", mode_of(nonce))
    return Sealer(derive(key, nonce) if key else None, nonce)


def join(store, rank: int, key: bytes | None, wait_until) -> Sealer:
    """A node other than node 0: prove the token to node 0 and check node 0's proof back.
    `wait_until(what)` sleeps a little, or raises when --timeout has passed (naming `what`)."""
    import socket

    while not store.check(["auth/mode"]):
        wait_until("node 0's answer to this node's join")
    nonce = nonce_of(store.get("auth/mode").decode())
    if key is not None and nonce is not None:
        key = derive(key, nonce)
    n = store.add("auth/attempts", 1)
    claim = {"node": rank, "host": socket.gethostname(), "proof": proof(key, nonce, "join", rank, n) if key and nonce else None}
    store.set(f"auth/attempt/{n}", json.dumps(claim))
    if nonce is None:
        if key is not None:
            raise JoinRefused("--rdzv-token: this node has a join token but node 0 runs without one: start every node "
                              f"with the same --rdzv-token (or {ENV}), or none of them")
        return Sealer(None, None)
    if key is None:
        raise JoinRefused(f"node 0 requires a join token: start this node with --rdzv-token (or {ENV}) set to the "
                          "token node 0 was started with")
    while not store.check([f"auth/verdict/{n}"]):
        wait_until("node 0's answer to this node's join")
    try:
        verdict = json.loads(store.get(f"auth/verdict/{n}"))
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        raise JoinRefused("node 0's answer to this node's join is not readable (is another process listening on "
                          "--master-port?)")
    if not verdict.get("admitted"):
        raise JoinRefused(f"node 0 refused this node: {verdict.get('why', 'no reason given')}")
    if not check(key, nonce, verdict.get("proof"), "admit", rank, n):
        raise JoinRefused("the node 0 that answered cannot prove the join token: this node will not join it (is "
                          "another process listening on --master-port?)")
    return Sealer(key, nonce)


class Admissions:
    """Node 0's side: answers every join attempt, in order, for the run's whole life (after the
    rendezvous, every attempt is refused); logs each refusal naming the node and its host."""

    def __init__(self, sealer: Sealer, log, missing_s: float = 5.0) -> None:
        self.key, self.nonce, self.log, self.seen = sealer.key, sealer.nonce, log, 0
        self.missing_s = missing_s  # an attempt counted but not written for this long: its node died
        self._missing_since: float | None = None

    def answer(self, store, open_: bool = True) -> None:
        import time

        if self.key is None:
            return  # an open run: nobody waits for a verdict
        while self.seen < int(store.add("auth/attempts", 0)):
            i = self.seen + 1
            if not store.check([f"auth/attempt/{i}"]):
                # counted but not yet written: next time, unless its node died in between
                self._missing_since = self._missing_since or time.monotonic()
                if time.monotonic() - self._missing_since < self.missing_s:
                    return
            self._missing_since = None
            self.seen = i
            if not store.check([f"auth/attempt/{i}"]):
                continue
            try:
                claim = json.loads(store.get(f"auth/attempt/{i}"))
            except ValueError:
                claim = {}
            claim = claim if isinstance(claim, dict) else {}
            node, host = claim.get("node"), claim.get("host", "?")
            if not open_:
                verdict = {"admitted": False, "why": "the run has already started"}
            elif check(self.key, self.nonce, claim.get("proof"), "join", node, i):
                verdict = {"admitted": True, "proof": proof(self.key, self.nonce, "admit", node, i)}
            else:
                why = "it has no join token" if claim.get("proof") is None else "its join token is wrong"
                verdict = {"admitted": False, "why": f"{why} (--rdzv-token or {ENV} must be node 0's)"}
            if not verdict["admitted"]:
                self.log.warning(f"refused a node that asked to join as node {node} from host {host}: {verdict['why']}")
            store.set(f"auth/verdict/{i}", json.dumps(verdict))
