#!/usr/bin/env python3
"""Generate itsdangerous.json: reference tokens for verimail's itsdangerous compatibility.

Run from anywhere with Python 3.11+ and itsdangerous 2.x:

    python3 shared/tests/vectors/gen_itsdangerous.py

The output is deterministic (fixed secrets, salts and timestamps; the clock is
patched) and committed, so the Rust tests (`tests/token_vectors.rs`) never need
Python. Regenerate only on purpose and review the diff.

Byte-identical compressed tokens depend on the zlib Python links against: the
committed file was made with the reference C zlib (madler, 1.2.x/1.3.x). A
Python built on zlib-ng (some distributions ship it as the system zlib) makes
different, equally valid, compressed tokens: the generator refuses to run there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import random
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

OUT = Path(__file__).with_name("itsdangerous.json")

DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}

SECRET = "correct horse battery staple"
OLD_SECRET = "tr0ub4dor&3"
OTHER_SECRET = "not the secret"
SALT = "email-confirm"
TS = 1_764_000_000  # 2025-11-24T16:00:00Z

_clock = [TS]


def _get_timestamp(self: TimestampSigner) -> int:
    return _clock[0]


# itsdangerous reads the clock through this one method, both to stamp a token
# and to measure its age when loading.
TimestampSigner.get_timestamp = _get_timestamp  # type: ignore[method-assign]


def compact(obj: Any) -> bytes:
    """What itsdangerous' URL-safe serializer signs (before compression)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def serializer(secrets: str | list[str], digest: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secrets, signer_kwargs={"digest_method": DIGESTS[digest]})


def dumps(secret: str, salt: str, digest: str, ts: int, payload: Any) -> str:
    _clock[0] = ts
    return serializer(secret, digest).dumps(payload, salt=salt)


def loads(secrets: list[str], salt: str, digest: str, token: str, now: int, max_age: int) -> dict[str, Any]:
    """Run `.loads` and record its outcome in the vocabulary of the Rust tests."""
    _clock[0] = now
    try:
        payload, signed_at = serializer(secrets, digest).loads(
            token, salt=salt, max_age=max_age, return_timestamp=True
        )
    except SignatureExpired as e:
        return {"outcome": "expired", "python_error": type(e).__name__}
    except BadSignature as e:
        return {"outcome": "invalid", "python_error": type(e).__name__}
    return {"outcome": "valid", "payload": payload, "issued_at": int(signed_at.timestamp())}


def boundary_emails() -> tuple[str, str]:
    """Two emails whose compact JSON compresses to exactly len-1 and len-2 bytes.

    itsdangerous compresses only when `len(compressed) < len(json) - 1`, so the
    first stays uncompressed and the second is compressed.
    """
    rng = random.Random(20251124)
    found: dict[int, str] = {}
    while len(found) < 2:
        unit = "".join(rng.choice("abcxyz") for _ in range(rng.randint(2, 6)))
        email = unit * rng.randint(2, 12) + "".join(rng.choice("qwertyuiop") for _ in range(rng.randint(0, 12))) + "@example.com"
        raw = compact(email)
        diff = len(raw) - len(zlib.compress(raw))
        if diff in (1, 2) and diff not in found:
            found[diff] = email
    return found[1], found[2]


def main() -> None:
    if not zlib.ZLIB_RUNTIME_VERSION.startswith("1.") or "ng" in zlib.ZLIB_RUNTIME_VERSION:
        sys.exit(f"refusing to run: zlib {zlib.ZLIB_RUNTIME_VERSION} is not the reference zlib")

    not_compressed_by_one, compressed_by_two = boundary_emails()
    emails = [
        "alice@example.com",
        "用户@例子.公司",
        "josé@example.com",
        'quote"and\\backslash@example.com',
        "slash/tab\tnl\ncr\rbs\bff\fnul\x00us\x1fdel\x7fls\u2028ps\u2029@example.com",
        "😀+tag@example.com",
        "",
        "a" * 64 + "@" + "b" * 63 + ".example.com",
        not_compressed_by_one,
        compressed_by_two,
        # Long, not repetitive: never compressed.
        "".join(random.Random(7).choice("abcdefghijklmnopqrstuvwxyz0123456789._-") for _ in range(200)) + "@example.com",
    ]
    others: list[Any] = [
        {"email": "alice@example.com", "purpose": "verify_email"},
        [1, -2, 2.5, 1e16, 1e-05, 0.1, 1e300, -0.0, True, False, None, "x"],
        {"a": "用户" * 40, "b": {"c": [None, 3]}},
    ]
    # Timestamps of every byte length, including 0 (an empty timestamp field).
    timestamps = [TS, 0, 1, 255, 256, 2**32, 2**35 + 12345]

    vectors: list[dict[str, Any]] = []
    for digest in DIGESTS:
        inputs = [(TS, p) for p in emails + others] + [(ts, "alice@example.com") for ts in timestamps[1:]]
        for ts, payload in inputs:
            vectors.append(
                {
                    "secret": SECRET,
                    "salt": SALT,
                    "digest": digest,
                    "timestamp": ts,
                    "payload": payload,
                    "compressed": len(zlib.compress(compact(payload))) < len(compact(payload)) - 1,
                    "token": dumps(SECRET, SALT, digest, ts, payload),
                }
            )

    # Python's float repr over the whole range. The floats travel as their IEEE-754
    # bits: a JSON reader may round a 17-digit decimal to a neighbouring float.
    rng = random.Random(11)
    floats = [f for f in (struct.unpack("<d", rng.randbytes(8))[0] for _ in range(80)) if math.isfinite(f)][:48]
    floats += [rng.uniform(-1e6, 1e6) for _ in range(8)] + [float(f"1e{e}") for e in range(-8, 20, 3)]
    float_vectors = [
        {
            "secret": SECRET,
            "salt": SALT,
            "digest": digest,
            "timestamp": TS,
            "bits": [f"{struct.unpack('<Q', struct.pack('<d', f))[0]:016x}" for f in floats],
            "json": compact(floats).decode(),
            "token": dumps(SECRET, SALT, digest, TS, floats),
        }
        for digest in DIGESTS
    ]

    # The PROOF of the contract: SHA-256, salt + ".proof", keys in this order.
    proofs: list[dict[str, Any]] = []
    for proof in [
        {"request_id": "5f1c2a7e-0000-4000-8000-000000000001", "user_id": "42", "email": "alice@example.com", "purpose": "reset_password"},
        {"request_id": None, "user_id": None, "email": "用户@例子.公司", "purpose": "verify_email"},
        {"request_id": 'r"\\1', "user_id": "josé", "email": "josé@example.com", "purpose": "reset_password"},
        {"request_id": "r" * 100, "user_id": "u" * 100, "email": "x" * 60 + "@example.com", "purpose": "reset_password"},
    ]:
        proofs.append(
            {
                "secret": SECRET,
                "salt": SALT,
                "timestamp": TS,
                "proof": proof,
                "json": compact(proof).decode(),
                "token": dumps(SECRET, SALT + ".proof", "sha256", TS, proof),
            }
        )

    cases: list[dict[str, Any]] = []

    def case(name: str, secrets: list[str], salt: str, digest: str, token: str, now: int, max_age: int, **extra: Any) -> None:
        entry = {"name": name, "secrets": secrets, "salt": salt, "digest": digest, "token": token, "now": now, "max_age": max_age}
        entry.update(loads(secrets, salt, digest, token, now, max_age))
        entry.update(extra)
        cases.append(entry)

    for digest in DIGESTS:
        good = dumps(SECRET, SALT, digest, TS, "alice@example.com")
        packed = dumps(SECRET, SALT, digest, TS, "z" * 80 + "@example.com")
        old = dumps(OLD_SECRET, SALT, digest, TS, "bob@example.com")
        payload, ts, sig = good.split(".")
        d = digest
        case(f"{d}: valid", [SECRET], SALT, d, good, TS + 10, 3600)
        case(f"{d}: valid at the same second", [SECRET], SALT, d, good, TS, 3600)
        case(f"{d}: valid at exactly max_age", [SECRET], SALT, d, good, TS + 3600, 3600)
        case(f"{d}: expired one second after max_age", [SECRET], SALT, d, good, TS + 3601, 3600)
        case(f"{d}: expired when issued in the future", [SECRET], SALT, d, good, TS - 1, 3600)
        case(f"{d}: compressed payload", [SECRET], SALT, d, packed, TS + 1, 3600)
        case(f"{d}: tampered payload", [SECRET], SALT, d, ("J" + payload[1:]) + "." + ts + "." + sig, TS + 1, 3600)
        case(f"{d}: tampered timestamp", [SECRET], SALT, d, payload + "." + dumps(SECRET, SALT, d, TS + 1, "x").split(".")[1] + "." + sig, TS + 1, 3600)
        case(f"{d}: tampered signature", [SECRET], SALT, d, payload + "." + ts + "." + ("A" if sig[0] != "A" else "B") + sig[1:], TS + 1, 3600)
        case(f"{d}: truncated signature", [SECRET], SALT, d, good[:-2], TS + 1, 3600)
        case(f"{d}: no signature", [SECRET], SALT, d, payload + "." + ts, TS + 1, 3600)
        case(f"{d}: wrong salt", [SECRET], SALT + ".proof", d, good, TS + 1, 3600)
        case(f"{d}: wrong key", [OTHER_SECRET], SALT, d, good, TS + 1, 3600)
        case(f"{d}: wrong digest", [SECRET], SALT, "sha256" if d == "sha1" else "sha1", good, TS + 1, 3600)
        case(f"{d}: rotation, signed by the old key", [OLD_SECRET, SECRET], SALT, d, old, TS + 1, 3600)
        case(f"{d}: rotation, signed by the new key", [OLD_SECRET, SECRET], SALT, d, good, TS + 1, 3600)
        case(f"{d}: rotation, old key retired", [SECRET], SALT, d, old, TS + 1, 3600)
        case(f"{d}: expired and signed by the old key", [OLD_SECRET, SECRET], SALT, d, old, TS + 7200, 3600)
        case(f"{d}: garbage", [SECRET], SALT, d, "not-a-token", TS, 3600)
        case(f"{d}: empty", [SECRET], SALT, d, "", TS, 3600)
        # Python's base64 decoding is lenient; verimail accepts only the
        # canonical encoding its signers (and itsdangerous') produce.
        last = sig[-1]
        sibling = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        twin = sibling[sibling.index(last) ^ 1]
        case(f"{d}: non-canonical signature, unused trailing bits set", [SECRET], SALT, d, good[:-1] + twin, TS + 1, 3600,
             rust_outcome="invalid", note="Python ignores the unused low bits of the last base64 character")
        case(f"{d}: non-canonical signature, junk appended", [SECRET], SALT, d, good + "!=", TS + 1, 3600,
             rust_outcome="invalid", note="Python's base64 decoder skips characters outside the alphabet and stops at padding")

    doc = {
        "about": "Generated by gen_itsdangerous.py; do not edit by hand.",
        "itsdangerous": importlib.metadata.version("itsdangerous"),
        "python": sys.version.split()[0],
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "dumps": vectors,
        "floats": float_vectors,
        "proofs": proofs,
        "loads": cases,
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(vectors)} dumps, {len(float_vectors)} float lists, {len(proofs)} proofs, {len(cases)} loads cases to {OUT}")


if __name__ == "__main__":
    main()
