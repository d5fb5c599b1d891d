"""Key-encryption keys: the wrapped format, versions and rotation, and Cloud KMS's checksums.

There is no KMS emulator: ``FakeKms`` answers as the KMS API does (versions, checksums it
verifies and returns), and can be told to corrupt what it sends back.
"""

from __future__ import annotations

import base64
import secrets

import google_crc32c
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.api_core import exceptions
from google.cloud import kms

from event_delivery.keys.kek import (
    WRAPPED_FORMAT,
    CloudKms,
    KeysNotFound,
    KmsIntegrityError,
    LocalKeyFile,
    UnknownWrappedFormat,
    kek_version_of,
    verified_ciphertext,
    verified_plaintext,
)
from event_delivery.keys.sqlite import SqliteKeystore

KEY_NAME = "projects/p/locations/europe-west1/keyRings/event-delivery/cryptoKeys/subject-keys"


def crc(data: bytes) -> int:
    return google_crc32c.value(data)


class FakeKms:
    """The KMS API as this code uses it: a symmetric key with versions, the primary used to encrypt.

    Like KMS, it rejects a request whose checksum does not match what arrived, and reports
    which checksums it verified. ``corrupt`` flips a byte of what it sends back, after
    computing the checksum, as a faulty network or host would.
    """

    def __init__(self, name: str = KEY_NAME):
        self.name = name
        self.versions = {1: AESGCM.generate_key(256)}
        self.primary = 1
        self.requests = []
        self.corrupt = None  # "ciphertext" or "plaintext"
        self.created = []

    def rotate(self) -> int:
        self.primary = max(self.versions) + 1
        self.versions[self.primary] = AESGCM.generate_key(256)
        return self.primary

    def destroy(self, version: int) -> None:
        del self.versions[version]

    @staticmethod
    def _checked(request, field: str) -> bool:
        sent = request.get(f"{field}_crc32c")
        if sent is not None and sent != crc(request[field]):
            raise exceptions.InvalidArgument(f"{field} checksum mismatch")
        return sent is not None

    def encrypt(self, request):
        self.requests.append(("encrypt", request))
        assert request["name"] == self.name
        verified_plaintext, verified_aad = (
            self._checked(request, "plaintext"),
            self._checked(request, "additional_authenticated_data"),
        )
        nonce = secrets.token_bytes(12)
        aead = AESGCM(self.versions[self.primary])
        ciphertext = self.primary.to_bytes(4, "big") + nonce
        ciphertext += aead.encrypt(nonce, request["plaintext"], request["additional_authenticated_data"])
        checksum = crc(ciphertext)
        if self.corrupt == "ciphertext":
            ciphertext = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
        return kms.EncryptResponse(
            name=f"{self.name}/cryptoKeyVersions/{self.primary}",
            ciphertext=ciphertext,
            ciphertext_crc32c=checksum,
            verified_plaintext_crc32c=verified_plaintext,
            verified_additional_authenticated_data_crc32c=verified_aad,
        )

    def decrypt(self, request):
        self.requests.append(("decrypt", request))
        self._checked(request, "ciphertext")
        self._checked(request, "additional_authenticated_data")
        ciphertext = request["ciphertext"]
        version = int.from_bytes(ciphertext[:4], "big")
        if version not in self.versions:
            raise exceptions.FailedPrecondition(f"version {version} is destroyed")
        plaintext = AESGCM(self.versions[version]).decrypt(
            ciphertext[4:16], ciphertext[16:], request["additional_authenticated_data"]
        )
        checksum = crc(plaintext)
        if self.corrupt == "plaintext":
            plaintext = plaintext[:-1] + bytes([plaintext[-1] ^ 1])
        return kms.DecryptResponse(plaintext=plaintext, plaintext_crc32c=checksum)

    def get_crypto_key(self, request):
        if request["name"] != self.name:
            raise exceptions.NotFound("no such key")
        return kms.CryptoKey(name=self.name, primary={"name": f"{self.name}/cryptoKeyVersions/{self.primary}"})

    def create_key_ring(self, request):
        self.created.append(("key ring", request["parent"], request["key_ring_id"]))
        raise exceptions.AlreadyExists("the ring is there")  # provisioning again is harmless

    def create_crypto_key(self, request):
        self.created.append(("key", request["parent"], request["crypto_key_id"], request["crypto_key"]["purpose"]))


# The wrapped format and the local key file.


def test_a_wrapped_key_starts_with_its_format_byte_and_kek_version(tmp_path):
    kek = LocalKeyFile(tmp_path / "kek.key", create=True)
    data_key = secrets.token_bytes(32)
    wrapped = kek.wrap(data_key, b"key-id")
    assert wrapped[0] == 1 and kek_version_of(wrapped) == 1
    assert kek.unwrap(wrapped, b"key-id") == data_key
    for altered in (b"\x02" + wrapped[1:], b"", wrapped[:3]):
        with pytest.raises(UnknownWrappedFormat):
            kek.unwrap(altered, b"key-id")


def test_the_format_byte_is_bound_to_the_wrapped_key(tmp_path):
    """The body alone, under the same key and context, without the format in its associated data, does not unwrap."""
    kek = LocalKeyFile(tmp_path / "kek.key", create=True)
    wrapped = kek.wrap(secrets.token_bytes(32), b"key-id")
    key = base64.b64decode((tmp_path / "kek.key").read_text().split()[1])
    body = wrapped[5:]
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(body[:12], body[12:], b"key-id")
    AESGCM(key).decrypt(body[:12], body[12:], b"\x01key-id")


def test_a_key_file_is_made_by_provisioning_only_and_provisioning_again_keeps_it(tmp_path):
    path = tmp_path / "keys" / "kek.key"
    with pytest.raises(KeysNotFound, match="make provision"):
        LocalKeyFile(path)
    assert not (tmp_path / "keys").exists(), "a tool that finds no KEK makes nothing"
    wrapped = LocalKeyFile(path, create=True).wrap(b"k" * 32, b"id")
    before = path.read_bytes()
    LocalKeyFile(path, create=True)
    assert path.read_bytes() == before
    assert LocalKeyFile(path).unwrap(wrapped, b"id") == b"k" * 32
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_a_key_file_of_one_bare_line_is_version_one(tmp_path):
    key = secrets.token_bytes(32)
    (tmp_path / "kek.key").write_text(base64.b64encode(key).decode() + "\n")
    kek = LocalKeyFile(tmp_path / "kek.key")
    assert kek.versions == [1]
    wrapped = kek.wrap(b"k" * 32, b"id")
    assert kek_version_of(wrapped) == 1
    assert AESGCM(key).decrypt(wrapped[5:17], wrapped[17:], b"\x01id") == b"k" * 32


def test_rotating_a_key_file_wraps_under_the_new_version_and_destroying_the_old_makes_its_keys_unreadable(tmp_path):
    kek = LocalKeyFile(tmp_path / "kek.key", create=True)
    old = kek.wrap(b"o" * 32, b"id")
    assert kek.rotate() == 2
    new = kek.wrap(b"n" * 32, b"id")
    assert kek_version_of(new) == 2
    assert kek.unwrap(old, b"id") == b"o" * 32, "the old version unwraps until it is destroyed"
    with pytest.raises(ValueError, match="primary"):
        kek.destroy_version(2)
    kek.destroy_version(1)
    reread = LocalKeyFile(tmp_path / "kek.key")
    assert reread.versions == [2]
    assert reread.unwrap(new, b"id") == b"n" * 32
    with pytest.raises(KeysNotFound, match="version 1 .* was destroyed"):
        reread.unwrap(old, b"id")
    assert oct((tmp_path / "kek.key").stat().st_mode & 0o777) == oct(0o600)


# Cloud KMS: checksums both ways.


def encrypt_response(ciphertext=b"wrapped", **changes):
    fields = dict(
        name=f"{KEY_NAME}/cryptoKeyVersions/3",
        ciphertext=ciphertext,
        ciphertext_crc32c=crc(ciphertext),
        verified_plaintext_crc32c=True,
        verified_additional_authenticated_data_crc32c=True,
    )
    return kms.EncryptResponse(**{**fields, **changes})


def test_an_encrypt_response_whose_checksums_hold_gives_its_version_and_ciphertext():
    assert verified_ciphertext(encrypt_response(), KEY_NAME) == (3, b"wrapped")


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"verified_plaintext_crc32c": False}, "did not verify"),
        ({"verified_additional_authenticated_data_crc32c": False}, "did not verify"),
        ({"ciphertext_crc32c": crc(b"wrapped") ^ 1}, "does not match its checksum"),
        ({"ciphertext_crc32c": None}, "does not match its checksum"),
        ({"ciphertext": b"wrapped!"}, "does not match its checksum"),
        ({"name": "projects/p/locations/l/keyRings/r/cryptoKeys/other/cryptoKeyVersions/1"}, "not a version of"),
    ],
)
def test_an_encrypt_response_that_fails_a_check_is_refused(changes, reason):
    response = encrypt_response(**{k: v for k, v in changes.items() if k != "ciphertext"})
    if "ciphertext" in changes:  # the checksum of the original, the bytes of another
        response.ciphertext = changes["ciphertext"]
    with pytest.raises(KmsIntegrityError, match=reason):
        verified_ciphertext(response, KEY_NAME)


def test_a_decrypt_response_is_checked_against_its_checksum():
    assert verified_plaintext(kms.DecryptResponse(plaintext=b"key", plaintext_crc32c=crc(b"key"))) == b"key"
    for response in (
        kms.DecryptResponse(plaintext=b"kez", plaintext_crc32c=crc(b"key")),
        kms.DecryptResponse(plaintext=b"key"),
    ):
        with pytest.raises(KmsIntegrityError, match="does not match its checksum"):
            verified_plaintext(response)


def test_cloud_kms_wraps_with_the_named_key_and_checksums_of_what_it_sends(tmp_path):
    client = FakeKms()
    keystore = SqliteKeystore(CloudKms(KEY_NAME, client=client), str(tmp_path / "keys.db"), create=True)
    keystore.subject_keys(["alice"])
    reader = SqliteKeystore(CloudKms(KEY_NAME, client=client), str(tmp_path / "keys.db"))
    reader.subject_keys(["alice"], create=False)
    context = b"\x01" + keystore._current_wrapping().key_id.encode()
    encrypts = [r for kind, r in client.requests if kind == "encrypt"]
    decrypts = [r for kind, r in client.requests if kind == "decrypt"]
    assert encrypts and decrypts
    for request in encrypts:
        assert request["name"] == KEY_NAME and request["additional_authenticated_data"] == context
        assert request["plaintext_crc32c"] == crc(request["plaintext"])
        assert request["additional_authenticated_data_crc32c"] == crc(context)
    for request in decrypts:
        assert request["additional_authenticated_data"] == context
        assert request["ciphertext_crc32c"] == crc(request["ciphertext"])
        assert request["additional_authenticated_data_crc32c"] == crc(context)


def test_no_data_key_costs_a_kms_call_created_or_read(tmp_path):
    """KMS wraps one key-wrapping key a month; each process unwraps it once and wraps data keys itself."""
    client = FakeKms()
    keystore = SqliteKeystore(CloudKms(KEY_NAME, client=client), str(tmp_path / "keys.db"), create=True)
    subjects = [f"user-{i}" for i in range(300)]
    created = keystore.subject_keys(subjects)
    for name in ("subject-pseudonyms", "quarantine/search", "quarantine/search"):
        keystore.named_key(name)
    assert [kind for kind, _ in client.requests] == ["encrypt"], "one wrap, of the key-wrapping key"

    client.requests.clear()
    worker = SqliteKeystore(CloudKms(KEY_NAME, client=client), str(tmp_path / "keys.db"))  # another process
    for start in range(0, 300, 50):  # bundle after bundle
        batch = subjects[start : start + 50]
        assert worker.subject_keys(batch, create=False) == {s: created[s] for s in batch}
    assert [kind for kind, _ in client.requests] == ["decrypt"], "one unwrap, of the key-wrapping key"


@pytest.mark.parametrize("corrupt", ["ciphertext", "plaintext"])
def test_a_response_corrupted_on_the_way_back_is_refused(tmp_path, corrupt):
    client = FakeKms()
    kek = CloudKms(KEY_NAME, client=client)
    wrapped = kek.wrap(b"k" * 32, b"id")
    client.corrupt = corrupt
    with pytest.raises(KmsIntegrityError):
        kek.unwrap(wrapped, b"id") if corrupt == "plaintext" else kek.wrap(b"k" * 32, b"id")


def test_cloud_kms_records_the_version_that_wrapped_and_unwraps_after_rotation(tmp_path):
    client = FakeKms()
    kek = CloudKms(KEY_NAME, client=client)
    old = kek.wrap(b"o" * 32, b"id")
    client.rotate()
    assert kek.primary_version() == 2
    new = kek.wrap(b"n" * 32, b"id")
    assert (kek_version_of(old), kek_version_of(new)) == (1, 2)
    assert kek.unwrap(old, b"id") == b"o" * 32


def test_a_missing_kms_key_is_keys_not_found_and_provisioning_creates_it():
    client = FakeKms(name="projects/p/locations/l/keyRings/r/cryptoKeys/elsewhere")
    kek = CloudKms(KEY_NAME, client=client)
    with pytest.raises(KeysNotFound, match="no Cloud KMS key .*make provision"):
        kek.check()
    kek.provision()
    assert client.created == [
        ("key ring", "projects/p/locations/europe-west1", "event-delivery"),
        ("key", "projects/p/locations/europe-west1/keyRings/event-delivery", "subject-keys", "ENCRYPT_DECRYPT"),
    ]


def test_after_a_cloud_kms_rotation_no_key_of_a_copy_taken_before_it_unwraps(tmp_path):
    """A copy's data keys name key-wrapping keys the rotation deleted; its own key-wrapping key
    is under the destroyed version. The live keys all still unwrap."""
    client, path = FakeKms(), str(tmp_path / "keys.db")
    keystore = SqliteKeystore(CloudKms(KEY_NAME, client=client), path, create=True)
    before = keystore.subject_keys(["alice", "bob"], scope="play")
    copy = {key_id: wrapped for batch in keystore._scan_wrapped_keys() for key_id, wrapped in batch}
    client.rotate()  # gcloud kms keys versions create --primary
    assert keystore.rewrap().retired == 1
    assert keystore.kek_versions() == {2: 1}
    client.destroy(1)  # gcloud kms keys versions destroy 1

    reader = SqliteKeystore(CloudKms(KEY_NAME, client=client), path)
    assert reader.subject_keys(["alice", "bob"], scope="play", create=False) == before
    for key_id, wrapped in copy.items():
        refused = exceptions.FailedPrecondition if wrapped[0] == WRAPPED_FORMAT else KeysNotFound
        with pytest.raises(refused):
            reader._unwrap_key(key_id, wrapped)


def test_a_process_that_loaded_the_key_file_before_a_rotation_reads_the_new_version_when_it_meets_it(tmp_path):
    """A running local job meets the rotation's new key-wrapping keys, wrapped by a version its
    copy of the file did not hold: it reads the file again rather than report the version destroyed."""
    job, rotator = LocalKeyFile(tmp_path / "kek.key", create=True), LocalKeyFile(tmp_path / "kek.key")
    rotator.rotate()
    wrapped = rotator.wrap(b"n" * 32, b"id")
    assert job.unwrap(wrapped, b"id") == b"n" * 32
    assert job.primary_version() == 2, "and wraps under the new primary from then on"
    rotator.destroy_version(1)
    with pytest.raises(KeysNotFound, match="version 3 .* was destroyed"):
        job.unwrap(wrapped[:1] + (3).to_bytes(4, "big") + wrapped[5:], b"id")
