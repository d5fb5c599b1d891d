"""Key-encryption keys: what wraps every data key before it is stored.

Two implementations behind one interface: a local key file for local runs and tests,
and Cloud KMS in production. Data keys never leave a process unwrapped, and a
wrapped key is bound (as associated data) to the key id it belongs to, so a wrapped
key copied onto another key id does not unwrap.

A key the KEK wraps starts with a header: a format byte (``WRAPPED_FORMAT``, 1), then
the version of the KEK that wrapped it (4 bytes, big-endian). The version says which
keys a rotation still has to re-wrap before the old KEK version can be destroyed
(``pipelines/rewrap.py``); the format byte, which is also bound as associated data,
tells these apart from the keys the keystore wraps locally (format 2, ``keystore.py``).

Both are created by provisioning only (``KeyConfig.provision``, ``make provision``): a
job or a tool that opens a KEK that is not there stops with ``KeysNotFound``, rather than
wrap keys under a new KEK nobody else holds.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import secrets
import stat
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
PRIVATE_FOLDER = 0o700  # a folder of keys is readable by its owner alone
WRAPPED_FORMAT = 1
HEADER = struct.Struct(">BI")  # format, KEK version
PROVISION_HINT = "create it with `make provision` (python -m tools.ops.provision)"


def private_folder(folder: str | os.PathLike) -> None:
    """Makes a folder of keys (and its parents) where missing, and leaves it readable by its owner
    alone, also when it existed. A folder that is not the user's own, is shared (sticky, as /tmp)
    or holds the working directory is not closed: it is not a folder of keys alone."""
    folder = pathlib.Path(folder)
    folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
    info = folder.stat()
    shared = info.st_uid != os.getuid() or info.st_mode & stat.S_ISVTX
    if not shared and not pathlib.Path.cwd().resolve().is_relative_to(folder.resolve()):
        folder.chmod(PRIVATE_FOLDER)


class KeysNotFound(FileNotFoundError):
    """A key-encryption key or a keystore that a job or tool must not create is not there."""


class UnknownWrappedFormat(ValueError):
    """A wrapped key this code cannot read: not written by it, or altered."""


class KmsIntegrityError(RuntimeError):
    """Cloud KMS, or the network on the way, altered a request or a response (CRC32C mismatch)."""


def wrapped_header(wrapped: bytes) -> tuple[int, int]:
    """``(format, KEK version)`` of a wrapped key."""
    if len(wrapped) < HEADER.size or wrapped[0] != WRAPPED_FORMAT:
        raise UnknownWrappedFormat(f"a wrapped key of unknown format {wrapped[:1].hex() or 'empty'}")
    return HEADER.unpack_from(wrapped)


def wrapped_by_kek(wrapped: bytes) -> bool:
    """Whether the KEK wrapped this key itself (format 1), rather than a key it wraps."""
    return wrapped[:1] == bytes([WRAPPED_FORMAT])


def kek_version_of(wrapped: bytes) -> int:
    """The version of the KEK that wrapped this key."""
    return wrapped_header(wrapped)[1]


def _associated_data(context: bytes) -> bytes:
    return bytes([WRAPPED_FORMAT]) + context


class KeyEncryptionKey:
    """Wraps and unwraps 256-bit data keys under its primary version; unwraps under any version it still has."""

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        version, body = self._wrap(data_key, _associated_data(context))
        return HEADER.pack(WRAPPED_FORMAT, version) + body

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        _, version = wrapped_header(wrapped)
        return self._unwrap(version, wrapped[HEADER.size :], _associated_data(context))

    def primary_version(self) -> int:
        """The version new wraps use: what a re-wrap brings every key to."""
        raise NotImplementedError

    def check(self) -> None:
        """Raises ``KeysNotFound`` unless the KEK exists and can be used."""

    def _wrap(self, data_key: bytes, associated_data: bytes) -> tuple[int, bytes]:
        raise NotImplementedError

    def _unwrap(self, version: int, body: bytes, associated_data: bytes) -> bytes:
        raise NotImplementedError


class LocalKeyFile(KeyEncryptionKey):
    """256-bit AES keys kept in a local file, mode 0600 in a 0700 folder: one line per version,
    ``<version> <base64 key>``; the highest version is the primary. A file of one bare base64
    line is version 1.

    Only provisioning creates the file (``create=True``); ``rotate`` adds a version and
    ``destroy_version`` removes one, which makes every key still wrapped under it unreadable.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = pathlib.Path(path)
        if create:
            private_folder(self.path.parent)
        if not self.path.exists():
            if not create:
                raise KeysNotFound(f"there is no key-encryption key file at {self.path}; {PROVISION_HINT}")
            with contextlib.suppress(FileExistsError):  # another provisioning run made it first: keep that one
                self._write({1: secrets.token_bytes(KEY_BYTES)}, exclusive=True)
        self._load()

    def _load(self) -> None:
        lines = [line.split() for line in self.path.read_text().splitlines() if line.strip()]
        if len(lines) == 1 and len(lines[0]) == 1:
            lines = [["1", lines[0][0]]]
        try:
            versions = {int(version): base64.b64decode(key) for version, key in lines}
        except ValueError:
            raise ValueError(f"{self.path} is not a key file of '<version> <base64 key>' lines") from None
        if not versions or any(len(key) != KEY_BYTES for key in versions.values()):
            raise ValueError(f"{self.path} does not hold 256-bit keys")
        self._aeads = {version: AESGCM(key) for version, key in versions.items()}
        self._keys = versions

    def _write(self, versions: dict[int, bytes], exclusive: bool = False) -> None:
        """Writes the whole file anew and swaps it in, so a reader sees the old file or the new one."""
        text = "".join(f"{v} {base64.b64encode(k).decode()}\n" for v, k in sorted(versions.items()))
        target = self.path if exclusive else self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(target, self.path)

    @property
    def versions(self) -> list[int]:
        return sorted(self._keys)

    def primary_version(self) -> int:
        return max(self._keys)

    def rotate(self) -> int:
        """Adds a new version and makes it the primary; returns it. Processes that loaded the
        file before keep wrapping under the old one until they read it again, which they do when
        they first meet a key wrapped by a version they do not hold (a rotation's new keys)."""
        self._load()
        version = self.primary_version() + 1
        self._write({**self._keys, version: secrets.token_bytes(KEY_BYTES)})
        self._load()
        return version

    def destroy_version(self, version: int) -> None:
        """Removes a version from the file: keys still wrapped under it can never be unwrapped again."""
        self._load()
        if version not in self._keys:
            raise ValueError(f"{self.path} holds no version {version}")
        if version == self.primary_version():
            raise ValueError(f"version {version} is the primary of {self.path}: rotate first")
        self._write({v: k for v, k in self._keys.items() if v != version})
        self._load()

    def _wrap(self, data_key, associated_data):
        version, nonce = self.primary_version(), secrets.token_bytes(NONCE_BYTES)
        return version, nonce + self._aeads[version].encrypt(nonce, data_key, associated_data)

    def _unwrap(self, version, body, associated_data):
        if version not in self._aeads:
            self._load()  # rotated by another process since this one read the file
        if version not in self._aeads:
            raise KeysNotFound(f"version {version} of the key-encryption key {self.path} was destroyed")
        return self._aeads[version].decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], associated_data)

    def __reduce__(self):
        # Workers re-read the file rather than receive key material in a pickled job.
        return (LocalKeyFile, (str(self.path),))


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def _version_number(version_name: str) -> int:
    """``.../cryptoKeyVersions/3`` -> 3."""
    return int(version_name.rsplit("/", 1)[-1])


def verified_ciphertext(response, key_name: str) -> tuple[int, bytes]:
    """``(KEK version, ciphertext)`` of a KMS encrypt response, once its checksums prove that
    KMS received the plaintext and associated data intact and that the ciphertext arrived intact."""
    if not (response.verified_plaintext_crc32c and response.verified_additional_authenticated_data_crc32c):
        raise KmsIntegrityError("Cloud KMS did not verify the checksums of the plaintext sent to it")
    if response.ciphertext_crc32c is None or response.ciphertext_crc32c != _crc32c(response.ciphertext):
        raise KmsIntegrityError("the ciphertext Cloud KMS returned does not match its checksum")
    if not response.name.startswith(f"{key_name}/cryptoKeyVersions/"):
        raise KmsIntegrityError(f"Cloud KMS encrypted with {response.name}, not a version of {key_name}")
    return _version_number(response.name), response.ciphertext


def verified_plaintext(response) -> bytes:
    """The plaintext of a KMS decrypt response, once its checksum proves it arrived intact."""
    if response.plaintext_crc32c is None or response.plaintext_crc32c != _crc32c(response.plaintext):
        raise KmsIntegrityError("the plaintext Cloud KMS returned does not match its checksum")
    return response.plaintext


class CloudKms(KeyEncryptionKey):
    """A Cloud KMS symmetric key, e.g. ``projects/p/locations/l/keyRings/r/cryptoKeys/k``.

    Every call carries CRC32C checksums of what it sends, and checks those KMS returns, so a
    corrupted request or response fails instead of storing a key that never unwraps. KMS
    keeps the versions: rotating makes a new primary (``gcloud kms keys versions create
    --primary``); ``pipelines/rewrap.py`` then re-wraps every key before the old version is
    destroyed.
    """

    def __init__(self, key_name: str, client=None):
        self.key_name = key_name
        self._client = client

    @property
    def client(self):
        if self._client is None:
            from google.cloud import kms

            self._client = kms.KeyManagementServiceClient()
        return self._client

    def _wrap(self, data_key, associated_data):
        response = self.client.encrypt(
            request={
                "name": self.key_name,
                "plaintext": data_key,
                "additional_authenticated_data": associated_data,
                "plaintext_crc32c": _crc32c(data_key),
                "additional_authenticated_data_crc32c": _crc32c(associated_data),
            }
        )
        return verified_ciphertext(response, self.key_name)

    def _unwrap(self, version, body, associated_data):
        # KMS reads the version from the ciphertext itself.
        response = self.client.decrypt(
            request={
                "name": self.key_name,
                "ciphertext": body,
                "additional_authenticated_data": associated_data,
                "ciphertext_crc32c": _crc32c(body),
                "additional_authenticated_data_crc32c": _crc32c(associated_data),
            }
        )
        return verified_plaintext(response)

    def _crypto_key(self):
        from google.api_core import exceptions

        try:
            return self.client.get_crypto_key(request={"name": self.key_name})
        except exceptions.NotFound:
            raise KeysNotFound(f"there is no Cloud KMS key {self.key_name}; {PROVISION_HINT}") from None

    def primary_version(self) -> int:
        return _version_number(self._crypto_key().primary.name)

    def check(self) -> None:
        self._crypto_key()

    def provision(self) -> None:
        """Creates the key ring and the key, unless they exist."""
        from google.api_core import exceptions

        parent, _, key_id = self.key_name.rpartition("/cryptoKeys/")
        location, _, ring_id = parent.rpartition("/keyRings/")
        with contextlib.suppress(exceptions.AlreadyExists):
            self.client.create_key_ring(request={"parent": location, "key_ring_id": ring_id, "key_ring": {}})
        with contextlib.suppress(exceptions.AlreadyExists):
            self.client.create_crypto_key(
                request={"parent": parent, "crypto_key_id": key_id, "crypto_key": {"purpose": "ENCRYPT_DECRYPT"}}
            )

    def __reduce__(self):
        return (CloudKms, (self.key_name,))


def key_encryption_key(local_key_file: str | None, kms_key: str | None, create: bool = False) -> KeyEncryptionKey:
    """The KEK the options select: Cloud KMS if named, else the local key file (made here only with ``create``)."""
    if kms_key:
        kek = CloudKms(kms_key)
        if create:
            kek.provision()
        return kek
    if local_key_file:
        return LocalKeyFile(local_key_file, create)
    raise ValueError("set --kms_key (production) or --local_key_file (local runs)")
