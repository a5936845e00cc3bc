"""Who may talk to a KV receiver: the cluster's shared secret, and the per-transfer capability.

Two credentials, both required on every transport:

- The cluster secret (`ClusterSecret`), known to every prefill and decode worker of one deployment. It signs every
  control-plane call (an HMAC over the method, a timestamp, a nonce and the exact request bytes, in gRPC metadata;
  the receiver signs its reply the same way, so the sender knows it reached a real receiver), and both ends of the
  data-plane hello prove it by challenge and response. A peer without it learns nothing: a call is refused with
  UNAUTHENTICATED before its body is parsed, a hello is closed without a byte of answer beyond the challenge.
- The capability of one transfer: 32 random bytes the decode worker draws when it registers the transfer and hands,
  in the prefill request, to the one prefill worker it chose. Opening, renewing, completing and aborting the
  transfer need it, and every data frame carries a tag keyed by it (and by the session that opened the transfer), so
  a worker holding the cluster secret still cannot touch another worker's transfers.

The secret comes from the caller (the Serve app passes it through the deployments' config), else the environment
(`GLMSERVE_KV_SECRET`, e.g. from a Kubernetes Secret), else it is drawn here once per process and exported to the
environment, so processes this one starts share it. There is no way to turn authentication off.

Without TLS the bytes travel in the clear: this authenticates peers and binds calls and frames to them; it does not
hide KV from a wire-tapper. Keep the transfer ports on a private network (README, "Trust boundary").
"""

import hashlib
import hmac
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

ENV_VAR = "GLMSERVE_KV_SECRET"
MIN_SECRET_BYTES = 16
CAPABILITY_BYTES = 32
NONCE_BYTES = 16
TAG_BYTES = 16
CLOCK_SKEW_S = 120.0  # how far a call's timestamp may be from the receiver's clock (and how long nonces are kept)

MD_TIME, MD_NONCE, MD_MAC = "x-glmserve-kvt-time", "x-glmserve-kvt-nonce", "x-glmserve-kvt-mac"
MD_REPLY_MAC = "x-glmserve-kvt-reply-mac"

_lock = threading.Lock()


class ClusterSecret:
    """The shared secret of one deployment. Its repr never shows the value."""

    __slots__ = ("_key",)

    def __init__(self, value: bytes | str):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if len(raw) < MIN_SECRET_BYTES:
            raise ValueError(f"the KV transfer secret must have at least {MIN_SECRET_BYTES} bytes")
        # one derived key per use, so a MAC of one kind can never stand for another
        self._key = hashlib.blake2b(raw, digest_size=32, person=b"glmserve-kvt").digest()

    def mac(self, label: bytes, *parts: bytes) -> bytes:
        return hmac.digest(self._key, _frame(label, *parts), "sha256")

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"

    @staticmethod
    def generate() -> str:
        return secrets.token_hex(32)


def resolve_secret(value: "ClusterSecret | bytes | str | None" = None) -> ClusterSecret:
    """The given secret, else `GLMSERVE_KV_SECRET`, else one drawn now and exported to the environment."""
    if isinstance(value, ClusterSecret):
        return value
    if value is not None:
        return ClusterSecret(value)
    with _lock:
        found = os.environ.get(ENV_VAR)
        if not found:
            found = ClusterSecret.generate()
            os.environ[ENV_VAR] = found
    return ClusterSecret(found)


def exported_secret() -> str:
    """This process's secret as the environment holds it (drawn and exported first if there is none), to hand to
    processes it starts that do not inherit its environment (Ray actors)."""
    resolve_secret()
    return os.environ[ENV_VAR]


def new_capability() -> bytes:
    return secrets.token_bytes(CAPABILITY_BYTES)


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _frame(label: bytes, *parts: bytes) -> bytes:
    """Length-prefixed parts: no two different part lists give the same bytes."""
    out = bytearray(label)
    for part in parts:
        out += struct.pack("<I", len(part))
        out += part
    return bytes(out)


# ---- control plane ----


def sign_call(secret: ClusterSecret, method: str, body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Metadata for one call, and its nonce (the reply's MAC covers it)."""
    stamp = str(time.time_ns()).encode()
    nonce = secrets.token_bytes(NONCE_BYTES)
    mac = secret.mac(b"call", method.encode(), stamp, nonce, body)
    return [(MD_TIME, stamp.decode()), (MD_NONCE, nonce.hex()), (MD_MAC, mac.hex())], nonce


def sign_reply(secret: ClusterSecret, method: str, nonce: bytes, body: bytes) -> tuple[tuple[str, str]]:
    return ((MD_REPLY_MAC, secret.mac(b"reply", method.encode(), nonce, body).hex()),)


def reply_is_signed(secret: ClusterSecret, method: str, nonce: bytes, body: bytes, metadata) -> bool:
    given = dict(metadata or ()).get(MD_REPLY_MAC, "")
    return _hex_equal(given, secret.mac(b"reply", method.encode(), nonce, body))


class CallVerifier:
    """Checks a call's metadata; remembers the nonces seen within the clock window so a call cannot be replayed."""

    def __init__(self, secret: ClusterSecret, max_nonces: int = 1 << 16):
        self.secret = secret
        self.max_nonces = max_nonces
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, method: str, body: bytes, metadata: Sequence[tuple[str, str | bytes]]) -> bytes | None:
        """The call's nonce if it is authentic and fresh, else None."""
        md = {key: value for key, value in metadata or () if isinstance(value, str)}
        try:
            stamp = md[MD_TIME]
            nonce = bytes.fromhex(md[MD_NONCE])
            sent_at = int(stamp) / 1e9
        except (KeyError, ValueError):
            return None
        now = time.time()
        if abs(now - sent_at) > CLOCK_SKEW_S or len(nonce) != NONCE_BYTES:
            return None
        if not _hex_equal(md.get(MD_MAC, ""), self.secret.mac(b"call", method.encode(), stamp.encode(), nonce, body)):
            return None
        with self._lock:
            while self._seen and (len(self._seen) >= self.max_nonces or next(iter(self._seen.values())) < now):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return None
            self._seen[nonce] = now + 2 * CLOCK_SKEW_S
        return nonce


def _hex_equal(given: str, want: bytes) -> bool:
    try:
        raw = bytes.fromhex(given)
    except ValueError:
        return False
    return hmac.compare_digest(raw, want)


# ---- data plane ----


def hello_proof(secret: ClusterSecret, role: bytes, session_id: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What one end of the data-plane hello sends to prove the secret (`role`: b"receiver" or b"sender")."""
    return secret.mac(b"hello", role, session_id.encode(), client_nonce, server_nonce)


def frame_key(capability: bytes, session_id: str) -> bytes:
    """The key of a transfer's frame tags: only the holder of the capability, in the session that opened the
    transfer, can make them."""
    return hashlib.blake2b(session_id.encode(), key=capability, digest_size=32, person=b"glmserve-frame").digest()


def frame_tag(key: bytes, header: bytes) -> bytes:
    return hashlib.blake2b(header, key=key, digest_size=TAG_BYTES).digest()
