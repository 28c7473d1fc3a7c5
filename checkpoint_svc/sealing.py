"""Clients' data sealed at rest: states, pending writes and event payloads encrypted with
AES-GCM before SQL and Redis, when a key ring is configured (docs/security.md#encryption-at-rest).

A sealed value is `MAGIC`, the key id (its length in one byte, then the id), a 16-byte salt,
a 12-byte nonce, then the ciphertext and its tag. Every process draws one salt per key and
seals under a key derived from the key and that salt (HKDF-SHA256), with counter nonces: so no
nonce repeats under one derived key, however many values a key seals (random 96-bit nonces
under one key would be good for 2^32 values only). The associated data binds the header and
where the value belongs (tenant, namespace, thread, and the checkpoint id, write slot or event
seq), so a value copied to another row fails to open just as a flipped byte does: DataLoss.

Without a key ring, values are stored as the client sent them; a sealed one found then is
DataLoss too (a replica started without the key ring must not answer ciphertext).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, field_validator

from checkpoint_svc.domain import ThreadKey
from checkpoint_svc.errors import DataLoss
from workflow_rpc.config_files import parse_yaml_file
from workflow_rpc.reloading import ReloadedFiles

__all__ = ["KEY_BYTES", "MAGIC", "KeyRing", "Sealing", "new_key"]

MAGIC = b"\x00wfe1"  # no JSON text starts with a NUL byte; a client's binary state might
KEY_BYTES = 32  # AES-256
_SALT_BYTES = 16
_NONCE_BYTES = 12
RELOAD_CHECK_SECONDS = 1.0


def new_key() -> str:
    """A fresh key, as a key ring file holds it (base64 of 32 random bytes)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    """Stored with every value it seals; never reuse one for another key."""
    key: bytes
    """Base64 of 32 random bytes (`python -m checkpoint_svc new-key`)."""

    @field_validator("key", mode="before")
    @classmethod
    def _decoded(cls, value: object) -> bytes:
        if not isinstance(value, str):
            raise ValueError("base64 text of 32 bytes")
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("not base64") from None
        if len(raw) != KEY_BYTES:
            raise ValueError(f"{len(raw)} bytes; a key is {KEY_BYTES} bytes (AES-256)")
        return raw


class _KeyRingModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry] = Field(min_length=1)
    """Oldest first: new values are sealed with the last one; every one listed still opens."""
    seal_with: str = ""
    """The id of the key new values are sealed with, if not the last one: a key added to
    every replica's file opens before any replica seals with it."""
    read_unencrypted: bool = False
    """Also read values stored before encryption was on (else they are DataLoss)."""


@dataclass(frozen=True, slots=True)
class _Keys:
    by_id: dict[str, bytes]
    newest: str
    read_unencrypted: bool


def _parse_key_ring(files: list[bytes]) -> _Keys:
    (raw,) = files
    model = parse_yaml_file(raw, _KeyRingModel, "key ring")
    by_id: dict[str, bytes] = {}
    for i, entry in enumerate(model.keys):
        if entry.id in by_id:
            raise ValueError(f"not a key ring: keys.{i}.id: {entry.id!r} is listed twice")
        by_id[entry.id] = entry.key
    newest = model.seal_with or model.keys[-1].id
    if newest not in by_id:
        raise ValueError(f"not a key ring: seal_with: {newest!r} is not one of its keys")
    return _Keys(by_id, newest, model.read_unencrypted)


class KeyRing:
    """The keys of `--encryption-keys`, read again when the file changes (a key added there
    seals from then on, without a restart)."""

    def __init__(self, path: Path) -> None:
        self._file = ReloadedFiles([path], _parse_key_ring, "key ring", RELOAD_CHECK_SECONDS)
        self._lock = threading.Lock()
        # This process's salt and nonce counter per key id, and derived keys by salt.
        self._sealing: dict[tuple[str, bytes], tuple[bytes, AESGCM, itertools.count]] = {}
        self._opening: LRUCache[tuple[bytes, bytes], AESGCM] = LRUCache(maxsize=1024)

    @property
    def read_unencrypted(self) -> bool:
        return self._file.current().read_unencrypted

    def sealed_with_newest(self, sealed: bytes) -> bool:
        """Whether a stored value is sealed with the key new values are sealed with."""
        return sealed.startswith(_header(self._file.current().newest))

    def seal(self, plain: bytes, context: bytes) -> bytes:
        keys = self._file.current()
        key_id = keys.newest
        key = keys.by_id[key_id]
        with self._lock:
            found = self._sealing.get((key_id, key))
            if found is None:
                salt = os.urandom(_SALT_BYTES)
                found = (salt, _derived(key, salt), itertools.count())
                self._sealing[(key_id, key)] = found
                self._opening[(key, salt)] = found[1]
            salt, aead, counter = found
            nonce = next(counter).to_bytes(_NONCE_BYTES, "big")
        header = _header(key_id) + salt + nonce
        return header + aead.encrypt(nonce, plain, header + context)

    def open(self, sealed: bytes, context: bytes, what: str) -> bytes:
        key_id, body = _split(sealed, what)
        key = self._file.current().by_id.get(key_id)
        if key is None and self._file.reload(now_if_changed=True):  # a replica rotated first
            key = self._file.value.by_id.get(key_id)
        if key is None:
            raise DataLoss(
                f"{what} is sealed with key {key_id!r}, which the key ring "
                "(--encryption-keys) does not hold"
            )
        salt = body[:_SALT_BYTES]
        nonce = body[_SALT_BYTES : _SALT_BYTES + _NONCE_BYTES]
        header_len = len(sealed) - len(body) + _SALT_BYTES + _NONCE_BYTES
        with self._lock:
            aead = self._opening.get((key, salt))
            if aead is None:
                aead = self._opening[(key, salt)] = _derived(key, salt)
        try:
            return aead.decrypt(
                nonce, body[_SALT_BYTES + _NONCE_BYTES :], sealed[:header_len] + context
            )
        except InvalidTag:
            raise DataLoss(
                f"{what} does not authenticate: it was changed or moved since it was sealed"
            ) from None


def _derived(key: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=b"wf-seal-v1")
    return AESGCM(hkdf.derive(key))


def _header(key_id: str) -> bytes:
    raw = key_id.encode()
    return MAGIC + bytes([len(raw)]) + raw


def _split(sealed: bytes, what: str) -> tuple[str, bytes]:
    """The key id and what follows it, or DataLoss for a value too short to be sealed."""
    at = len(MAGIC)
    if len(sealed) > at:
        end = at + 1 + sealed[at]
        if len(sealed) >= end + _SALT_BYTES + _NONCE_BYTES + 16:
            try:
                return sealed[at + 1 : end].decode(), sealed[end:]
            except UnicodeDecodeError:
                pass
    raise DataLoss(f"{what} is damaged: its sealed header does not parse")


def _context(kind: str, key: ThreadKey, *where: object) -> bytes:
    return json.dumps([kind, key.tenant, key.namespace, key.thread_id, *where]).encode()


class Sealing:
    """How the tiers store the columns that hold clients' data: sealed with a key ring, as
    sent without one. Opening refuses, as DataLoss, anything that is not what it should be.
    Without a key ring a value costs one comparison (the hot path's every row)."""

    def __init__(self, ring: KeyRing | None = None) -> None:
        self.ring = ring

    def _plaintext_allowed(self, what: str) -> None:
        if self.ring is not None and not self.ring.read_unencrypted:
            raise DataLoss(
                f"{what} is not encrypted (a key ring's read_unencrypted: true reads such rows)"
            )

    def _open(self, stored: bytes, context: bytes, what: str) -> bytes:
        if stored[: len(MAGIC)] != MAGIC:
            self._plaintext_allowed(what)
            return stored
        if self.ring is None:
            raise DataLoss(f"{what} is encrypted, and this store has no --encryption-keys")
        return self.ring.open(stored, context, what)

    def state(self, key: ThreadKey, checkpoint_id: str, plain: bytes) -> bytes:
        if self.ring is None:
            return plain
        return self.ring.seal(plain, _context("state", key, checkpoint_id))

    def open_state(self, key: ThreadKey, checkpoint_id: str, stored: bytes) -> bytes:
        if self.ring is None and stored[: len(MAGIC)] != MAGIC:
            return stored
        what = f"the state of checkpoint {checkpoint_id}"
        return self._open(stored, _context("state", key, checkpoint_id), what)

    def value(
        self, key: ThreadKey, checkpoint_id: str, task_id: str, idx: int, plain: bytes
    ) -> bytes:
        if self.ring is None:
            return plain
        return self.ring.seal(plain, _context("write", key, checkpoint_id, task_id, idx))

    def open_value(
        self, key: ThreadKey, checkpoint_id: str, task_id: str, idx: int, stored: bytes
    ) -> bytes:
        if self.ring is None and stored[: len(MAGIC)] != MAGIC:
            return stored
        what = f"write {task_id}/{idx} of checkpoint {checkpoint_id}"
        return self._open(stored, _context("write", key, checkpoint_id, task_id, idx), what)

    def payload(self, key: ThreadKey, seq: int, payload: dict[str, Any]) -> str:
        """A JSON object as sent; sealed, a JSON string (base64) in its place."""
        text = json.dumps(payload)
        if self.ring is None:
            return text
        sealed = self.ring.seal(text.encode(), _context("event", key, seq))
        return json.dumps(base64.b64encode(sealed).decode())

    def open_payload(self, key: ThreadKey, seq: int, stored: str) -> dict[str, Any]:
        what = f"the payload of event {seq} of {key.namespace}/{key.thread_id}"
        try:
            loaded = json.loads(stored)
            if isinstance(loaded, dict):
                self._plaintext_allowed(what)
                return loaded
            if not isinstance(loaded, str):
                raise DataLoss(f"{what} is neither a JSON object nor sealed")
            sealed = base64.b64decode(loaded, validate=True)
        except ValueError:  # not JSON, not base64 (binascii.Error is one)
            raise DataLoss(f"{what} is damaged: neither a JSON object nor sealed") from None
        if sealed[: len(MAGIC)] != MAGIC:
            raise DataLoss(f"{what} is damaged: its sealed header does not parse")
        return json.loads(self._open(sealed, _context("event", key, seq), what))

    @staticmethod
    def sealed_payload(stored: str) -> bytes | None:
        """The sealed value a payload column holds (None: a plaintext object, or damaged)."""
        with contextlib.suppress(ValueError):
            loaded = json.loads(stored)
            if isinstance(loaded, str):
                return base64.b64decode(loaded, validate=True)
        return None

    def message(self, tenant: str, plain: bytes) -> bytes:
        """A feed message between replicas (through Redis)."""
        if self.ring is None:
            return plain
        return self.ring.seal(plain, json.dumps(["feed", tenant]).encode())

    def open_message(self, tenant: str, stored: bytes) -> bytes:
        if self.ring is None and stored[: len(MAGIC)] != MAGIC:
            return stored
        return self._open(stored, json.dumps(["feed", tenant]).encode(), "a feed message")
