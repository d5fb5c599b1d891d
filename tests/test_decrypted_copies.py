"""Decrypted copies: decrypt records every file it writes in the inventory, and forget lists
or purges the files that hold a forgotten subject in clear, on local folders and the GCS emulator."""

from __future__ import annotations

import pytest

from event_delivery.cloud import files
from event_delivery.contract.registry import get_event_type
from event_delivery.keys.fields import encrypt_value
from pipelines import decrypt, forget
from tests.conftest import valid_fields
from tests.streams import local_keys

SEARCH = get_event_type("search")
# Hour -> the subjects whose searches its delivered file holds: one each, then both mixed.
HOURS = {"00": ["alice"], "01": ["bob"], "02": ["alice", "bob"]}


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.emulators)])
def root(request, tmp_path):
    """Where the delivered data, the decrypted copies and the inventory live."""
    return str(tmp_path / "data") if request.param == "local" else f"gs://{request.getfixturevalue('bucket')}"


@pytest.fixture
def keys(tmp_path):
    return local_keys(tmp_path / "keys")


def key_flags(keys):
    return [f"--keystore={keys.keystore}", f"--local_key_file={keys.local_key_file}"]


def deliver_searches(root: str, keystore) -> None:
    """Writes each hour's delivered file as the delivery job does: personal fields sealed under each subject's key."""
    keys = keystore.subject_keys(["alice", "bob"])
    for hour, subjects in HOURS.items():
        records = []
        for i, subject in enumerate(subjects):
            key, event_id = keys[subject], f"{subject}-{hour}"
            fields = {**valid_fields(SEARCH, i), "user_id": subject}
            for field in SEARCH.personal_fields:
                fields[field] = encrypt_value(key.aead, fields[field], "search", field, key.key_id, event_id)
            records.append({"event_id": event_id, "received_at": 1_764_374_400_000, "key_id": key.key_id, **fields})
        path = f"{root}/delivered/search/dt=2026-11-29/hr={hour}/search-run1-p00000-s000.avro"
        files.write_avro(path, SEARCH.parsed_delivered_schema, records)


def clear_file(root: str, copy: str, hour: str) -> str:
    return f"{root}/{copy}/search/dt=2026-11-29/hr={hour}/search-run1-p00000-s000.avro"


def run_decrypt(root, keys, copy, end, capsys) -> str:
    argv = ["--event_type", "search", "--input_root", f"{root}/delivered", "--output_root", f"{root}/{copy}"]
    argv += ["--start", "2026-11-29T00", "--end", end, "--copies_inventory", f"{root}/copies", *key_flags(keys)]
    assert decrypt.main(argv) == 0
    return capsys.readouterr().out


def run_forget(root, keys, capsys, *subject_flags) -> str:
    assert forget.main([*subject_flags, "--copies_inventory", f"{root}/copies", *key_flags(keys)]) == 0
    return capsys.readouterr().out


def test_forget_lists_then_purges_the_decrypted_copies_recorded_by_every_decrypt_run(root, keys, tmp_path, capsys):
    keystore = keys.open()
    deliver_searches(root, keystore)
    key_ids = keystore.subject_key_ids(["alice", "bob"], create=False)

    first = run_decrypt(root, keys, "clear", "2026-11-29T03", capsys)
    [record] = decrypt.copies_records(f"{root}/copies")
    assert f"for forget in {record}" in first
    assert {line["path"]: line["key_ids"] for line in files.read_json_lines(record)} == {
        clear_file(root, "clear", "00"): [key_ids["alice"]],
        clear_file(root, "clear", "01"): [key_ids["bob"]],
        clear_file(root, "clear", "02"): sorted([key_ids["alice"], key_ids["bob"]]),
    }
    run_decrypt(root, keys, "again", "2026-11-29T01", capsys)  # a second run, of alice's hour only
    assert len(decrypt.copies_records(f"{root}/copies")) == 2, "each run has its own record"

    listed = run_forget(root, keys, capsys, "--subject", "bob")
    assert "decrypted copies: 2 file(s) hold these subjects in clear" in listed
    assert [line.strip() for line in listed.splitlines() if line.startswith("  ")] == [
        clear_file(root, "clear", "01"),
        clear_file(root, "clear", "02"),
    ]
    assert "bob" not in listed and "1 subject(s) whose keys were deleted" in listed
    assert all(files.exists(clear_file(root, "clear", hour)) for hour in HOURS), "a listing deletes nothing"

    files.delete_existing([clear_file(root, "again", "00")])  # deleted by hand meanwhile: no error
    requests = tmp_path / "requests.txt"
    requests.write_text("alice\n")
    purged = run_forget(root, keys, capsys, "--subjects_file", str(requests), "--decrypted_copies", "purge")
    assert "decrypted copies: 2 file(s) that held these subjects in clear deleted, 1 already gone" in purged
    assert "alice" not in purged and "1 subject(s) whose keys were deleted" in purged
    assert [files.exists(clear_file(root, "clear", hour)) for hour in HOURS] == [False, True, False]
    [purge] = files.glob(f"{root}/copies/purge-*.jsonl")
    assert f"the purge is recorded in {purge}" in purged
    assert files.read_json_lines(purge) == [
        {"path": clear_file(root, "again", "00"), "deleted": False},
        {"path": clear_file(root, "clear", "00"), "deleted": True},
        {"path": clear_file(root, "clear", "02"), "deleted": True},
    ]
    assert len(decrypt.copies_records(f"{root}/copies")) == 2, "the decrypt runs' records stay"


def test_a_decrypted_file_records_only_the_key_ids_it_holds_in_clear(keys, tmp_path, capsys):
    root = str(tmp_path / "data")
    keystore = keys.open()
    deliver_searches(root, keystore)
    bob = keystore.subject_key_ids(["bob"], create=False)["bob"]
    keystore.forget("alice")
    run_decrypt(root, keys, "clear", "2026-11-29T03", capsys)
    [record] = decrypt.copies_records(f"{root}/copies")
    assert [line["key_ids"] for line in files.read_json_lines(record)] == [[], [bob], [bob]]


def test_forget_says_when_no_decrypt_run_is_recorded(keys, tmp_path, capsys):
    keys.open().subject_keys(["alice"])
    out = run_forget(str(tmp_path), keys, capsys, "--subject", "alice")
    assert f"decrypted copies: no decrypt run is recorded in {tmp_path}/copies" in out
    assert "1 subject(s) whose keys were deleted" in out
