"""Key-encryption keys: what wraps every data key before it is stored.

Two implementations behind one interface: a local key file for local runs and tests,
and Cloud KMS in production. Data keys never leave a process unwrapped, and a
wrapped key is bound (as associated data) to the key id it belongs to, so a wrapped
key copied onto another key id does not unwrap.
"""

from __future__ import annotations

import base64
import os
import pathlib
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
PRIVATE_FOLDER = 0o700  # a folder of keys is readable by its owner alone


class KeysNotFound(FileNotFoundError):
    """A key-encryption key or a keystore that a tool must not create is not there."""


class KeyEncryptionKey:
    """Wraps and unwraps 256-bit data keys."""

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        raise NotImplementedError

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        raise NotImplementedError


class LocalKeyFile(KeyEncryptionKey):
    """A 256-bit AES key kept in a local file (base64), created on first use with mode 0600."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            if not create:
                raise KeysNotFound(f"there is no key-encryption key file at {self.path}")
            self.path.parent.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
        key = base64.b64decode(self.path.read_text().strip())
        if len(key) != KEY_BYTES:
            raise ValueError(f"{self.path} does not hold a 256-bit key")
        self._aead = AESGCM(key)

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)

    def __reduce__(self):
        # Workers re-read the file rather than receive key material in a pickled job.
        return (LocalKeyFile, (str(self.path), False))


class CloudKms(KeyEncryptionKey):
    """A Cloud KMS symmetric key, e.g. ``projects/p/locations/l/keyRings/r/cryptoKeys/k``."""

    def __init__(self, key_name: str, client=None):
        self.key_name = key_name
        self._client = client

    @property
    def client(self):
        if self._client is None:
            from google.cloud import kms

            self._client = kms.KeyManagementServiceClient()
        return self._client

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        response = self.client.encrypt(
            request={"name": self.key_name, "plaintext": data_key, "additional_authenticated_data": context}
        )
        return response.ciphertext

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        response = self.client.decrypt(
            request={"name": self.key_name, "ciphertext": wrapped, "additional_authenticated_data": context}
        )
        return response.plaintext

    def __reduce__(self):
        return (CloudKms, (self.key_name,))


def key_encryption_key(local_key_file: str | None, kms_key: str | None, create: bool = True) -> KeyEncryptionKey:
    """The KEK the options select: Cloud KMS if named, else the local key file (made here only with ``create``)."""
    if kms_key:
        return CloudKms(kms_key)
    if local_key_file:
        return LocalKeyFile(local_key_file, create)
    raise ValueError("set --kms_key (production) or --local_key_file (local runs)")
