"""Decrypted copies: decrypt records every file before it writes it, only outside the storage layout
and private to its owner, and forget lists, refuses over, or purges the files that hold a subject it
forgets in clear, never anything else, on local folders and the GCS emulator."""

from __future__ import annotations

import os
import stat

import pytest

from event_delivery.cloud import files
from event_delivery.contract.registry import get_event_type
from event_delivery.keys.fields import encrypt_value
from pipelines import copies_inventory, decrypt, forget
from tests.messages import valid_fields
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
        files.write_avro(delivered_file(root, hour), SEARCH.parsed_delivered_schema, records)


def delivered_file(root: str, hour: str) -> str:
    return f"{root}/delivered/search/dt=2026-11-29/hr={hour}/search-run1-p00000-s000.avro"


def clear_file(root: str, copy: str, hour: str) -> str:
    return f"{root}/{copy}/search/dt=2026-11-29/hr={hour}/search-run1-p00000-s000.avro"


def decrypt_argv(root, keys, copy, end="2026-11-29T03"):
    argv = ["--event_type", "search", "--input_root", f"{root}/delivered", "--output_root", f"{root}/{copy}"]
    return argv + ["--start", "2026-11-29T00", "--end", end, "--copies_inventory", f"{root}/copies", *key_flags(keys)]


def run_decrypt(root, keys, copy, capsys, end="2026-11-29T03") -> str:
    assert decrypt.main(decrypt_argv(root, keys, copy, end)) == 0
    return capsys.readouterr().out


def run_forget(root, keys, capsys, *flags, code=0):
    """Runs forget on the inventory under ``root``; returns its (stdout, stderr)."""
    argv = [*flags, "--copies_inventory", f"{root}/copies", *key_flags(keys)]
    if code == 0:
        assert forget.main(argv) == 0
    else:
        with pytest.raises(SystemExit) as exit_:
            forget.main(argv)
        assert exit_.value.code == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def listed(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


def test_forget_lists_refuses_keeps_then_purges_the_copies_recorded_by_every_decrypt_run(root, keys, tmp_path, capsys):
    keystore = keys.open()
    deliver_searches(root, keystore)
    key_ids = keystore.subject_key_ids(["alice", "bob"], create=False)

    first = run_decrypt(root, keys, "clear", capsys)
    [run] = copies_inventory.decrypt_runs(f"{root}/copies")
    assert f"for forget in {run.record}" in first and "recorded 3 decrypted file(s)" in first
    assert (run.event_type, run.output_root, run.storage_root) == ("search", f"{root}/clear", root)
    assert {copy.path: copy.key_ids for copy in run.copies} == {
        clear_file(root, "clear", "00"): [key_ids["alice"]],
        clear_file(root, "clear", "01"): [key_ids["bob"]],
        clear_file(root, "clear", "02"): sorted([key_ids["alice"], key_ids["bob"]]),
    }
    run_decrypt(root, keys, "again", capsys, end="2026-11-29T01")  # a second run, of alice's hour only
    assert len(copies_inventory.decrypt_runs(f"{root}/copies")) == 2, "each run has its own record"

    out, err = run_forget(root, keys, capsys, "--subject", "bob", code=2)
    assert "decrypted copies: 2 file(s) hold these subjects in clear" in out
    assert listed(out) == [clear_file(root, "clear", "01"), clear_file(root, "clear", "02")]
    assert "so their keys were not deleted" in err and "--decrypted_copies keep" in err
    assert "bob" not in out + err and "forgotten:" not in out
    assert keystore.key_ids_of("bob") == [key_ids["bob"]], "the keys, the only link to the copies, stay"

    out, _ = run_forget(root, keys, capsys, "--subject", "bob", "--decrypted_copies", "keep")
    assert listed(out) == [clear_file(root, "clear", "01"), clear_file(root, "clear", "02")]
    assert "1 subject(s) whose keys were deleted" in out
    assert all(files.exists(clear_file(root, "clear", hour)) for hour in HOURS), "a listing deletes nothing"

    files.delete_existing([clear_file(root, "again", "00")])  # deleted by hand meanwhile: no error
    requests = tmp_path / "requests.txt"
    requests.write_text("alice\n")
    out, _ = run_forget(root, keys, capsys, "--subjects_file", str(requests), "--decrypted_copies", "purge")
    assert "3 file(s) that held these or earlier forgotten subjects in clear deleted, 1 already gone" in out
    assert "alice" not in out and "1 subject(s) whose keys were deleted" in out
    assert not any(files.exists(clear_file(root, "clear", hour)) for hour in HOURS), "bob's kept copy too"
    [purge] = files.glob(f"{root}/copies/purge-*.jsonl")
    assert f"the purge is recorded in {purge}" in out
    assert files.read_json_lines(purge) == [
        {"path": clear_file(root, "again", "00"), "deleted": False},
        {"path": clear_file(root, "clear", "00"), "deleted": True},
        {"path": clear_file(root, "clear", "02"), "deleted": True},
        {"path": clear_file(root, "clear", "01"), "deleted": True},
    ]
    assert len(copies_inventory.decrypt_runs(f"{root}/copies")) == 2, "the decrypt runs' records stay"


def test_a_copy_kept_past_its_subjects_forget_is_still_found_by_the_next_forget(keys, tmp_path, capsys):
    """The inventory keeps the key ids; the keystore then no longer holds them: together they link a copy
    to a subject forgotten before, as when a decrypt run wrote it while forget ran."""
    root = str(tmp_path / "data")
    keystore = keys.open()
    deliver_searches(root, keystore)
    run_decrypt(root, keys, "clear", capsys, end="2026-11-29T02")  # alice's hour, bob's hour
    run_forget(root, keys, capsys, "--subject", "bob", "--decrypted_copies", "keep")

    out, _ = run_forget(root, keys, capsys, "--subject", "carol", "--allow_empty_keystore")  # no copy of hers
    assert "decrypted copies: 0 file(s) hold these subjects in clear" in out
    assert "decrypted copies: 1 file(s) hold subjects forgotten before in clear" in out
    assert listed(out) == [clear_file(root, "clear", "01")]
    assert "1 subject(s) had no key" in out, "copies of subjects forgotten before do not stop a forget"


def test_a_decrypt_run_records_each_file_before_writing_it_so_a_failed_run_is_found(
    keys, tmp_path, capsys, monkeypatch
):
    """At every write, the inventory already names the file; a run that fails halfway (or runs while
    forget looks) leaves its files recorded, and forget refuses over them."""
    root = str(tmp_path / "data")
    deliver_searches(root, keys.open())
    write_avro, written = files.write_avro, []

    def write_two_then_fail(path, schema, records, *more):
        [run] = copies_inventory.decrypt_runs(f"{root}/copies")
        assert path in [copy.path for copy in run.copies], "recorded before it is written"
        if len(written) == 2:
            raise OSError("disk full")
        written.append(path)
        return write_avro(path, schema, records, *more)

    monkeypatch.setattr(files, "write_avro", write_two_then_fail)
    with pytest.raises(Exception, match="disk full"):
        decrypt.main(decrypt_argv(root, keys, "clear"))
    monkeypatch.undo()
    [run] = copies_inventory.decrypt_runs(f"{root}/copies")
    assert len(run.copies) == 3 and set(written) < {copy.path for copy in run.copies}

    out, err = run_forget(root, keys, capsys, "--subject", "alice", code=2)
    alices = {clear_file(root, "clear", "00"), clear_file(root, "clear", "02")}
    assert listed(out) == sorted(path for path in alices if files.exists(path)), "written, or begun"
    assert alices.intersection(written) and alices.intersection(written) <= set(listed(out))
    assert "so their keys were not deleted" in err


def test_forget_stops_when_the_inventory_it_is_given_does_not_exist(keys, tmp_path, capsys):
    root = str(tmp_path / "data")
    deliver_searches(root, keys.open())
    run_decrypt(root, keys, "clear", capsys)
    wrong = [f"--copies_inventory={root}/copies-typo"]
    with pytest.raises(SystemExit) as exit_:
        forget.main(["--subject", "alice", *wrong, *key_flags(keys)])
    assert exit_.value.code == 2
    assert f"there is no inventory of decrypted copies at {root}/copies-typo" in capsys.readouterr().err
    assert keys.open().key_ids_of("alice"), "nothing was forgotten"

    assert forget.main(["--subject", "carol", "--copies_inventory", "none", *key_flags(keys)]) == 0
    assert "decrypted copies: not looked for (--copies_inventory none" in capsys.readouterr().out


def test_the_default_inventory_lies_beside_the_keystore_and_bigtable_needs_one_named(keys, tmp_path, capsys):
    keys.open().subject_keys(["alice"])
    assert forget.main(["--subject", "alice", *key_flags(keys)]) == 0, "no decrypt run has made it yet"
    assert f"no decrypt run is recorded in {tmp_path}/keys/decrypted-copies" in capsys.readouterr().out
    assert copies_inventory.default_inventory("sqlite:///.keys/keystore.db") == ".keys/decrypted-copies"
    with pytest.raises(SystemExit) as exit_:
        forget.main(["--subject", "alice", "--keystore", "bigtable://p/i/t", "--kms_key", "projects/p/k"])
    assert (
        exit_.value.code == 2 and "--copies_inventory is required with a Bigtable keystore" in capsys.readouterr().err
    )


def forge_lines(run_record: str, *paths_and_key_ids) -> None:
    """Adds lines to a finished run's record, as whoever can write the inventory could."""
    record = f"{run_record}/{copies_inventory.FILES}"
    lines = files.read_json_lines(record) + [{"path": p, "key_ids": [k]} for p, k in paths_and_key_ids]
    files.write_json_lines(record, lines)


def test_a_purge_deletes_only_files_under_the_output_root_of_the_run_that_recorded_them(keys, tmp_path, capsys):
    root = str(tmp_path / "data")
    keystore = keys.open()
    deliver_searches(root, keystore)
    alice = keystore.subject_key_ids(["alice"], create=False)["alice"]
    run_decrypt(root, keys, "clear", capsys)
    [run] = copies_inventory.decrypt_runs(f"{root}/copies")
    keystore_file = str(tmp_path / "keys" / "keystore.db")
    beside = f"{root}/clear/search/dt=2026-11-29/hr=00/../../../../delivered/search/dt=2026-11-29/hr=00/x.avro"
    os.symlink(f"{root}/delivered/search/dt=2026-11-29/hr=01", f"{root}/clear/search/dt=2026-11-29/hr=09")
    linked = clear_file(root, "clear", "09")  # under the output root by name, in the delivered root in fact
    forge_lines(run.record, *[(path, alice) for path in (delivered_file(root, "00"), keystore_file, beside, linked)])
    # A whole forged run that claims to have written into the delivered root.
    forged = copies_inventory.start_run(f"{root}/copies", "search", f"{root}/late", root, f"{root}/delivered")
    copies_inventory.record_copy(forged, copies_inventory.DecryptedCopy(delivered_file(root, "02"), [alice]))

    out, err = run_forget(root, keys, capsys, "--subject", "alice", "--decrypted_copies", "purge")
    assert "2 file(s) that held these or earlier forgotten subjects in clear deleted" in out
    for path in (delivered_file(root, "00"), keystore_file, beside, linked, delivered_file(root, "02")):
        assert f"decrypted copies: refused {path}" in err and "not a file its run writes" in err
    assert all(files.exists(delivered_file(root, hour)) for hour in HOURS), "no delivered partition touched"
    assert os.path.exists(keystore_file) and keys.open().key_ids_of("bob"), "the keystore is intact"
    assert not files.exists(clear_file(root, "clear", "00")) and not files.exists(clear_file(root, "clear", "02"))


@pytest.mark.parametrize("scheme", ["local", "gs"])
@pytest.mark.parametrize("output", ["delivered", "delivered/_staging/x", "late/x", "dead-letter", "raw/x", "audit/x"])
def test_decrypt_refuses_an_output_root_inside_any_root_of_the_storage_layout(keys, tmp_path, capsys, scheme, output):
    root = str(tmp_path / "data") if scheme == "local" else "gs://bucket"
    argv = decrypt_argv(root, keys, output)
    argv[argv.index("--input_root") + 1] = f"{root}/late" if output.startswith("delivered") else f"{root}/delivered"
    with pytest.raises(SystemExit) as exit_:
        decrypt.main(argv)
    assert exit_.value.code == 2
    assert "a clear copy never sits among sealed data" in capsys.readouterr().err
    # The layout of the storage root named, when the input root lies elsewhere.
    argv[argv.index("--input_root") + 1] = f"{root}-elsewhere/delivered"
    with pytest.raises(SystemExit):
        decrypt.main([*argv, "--storage_root", root])
    assert f"a root of the storage layout under {root}" in capsys.readouterr().err


def test_local_copies_are_private_whatever_the_umask(keys, tmp_path, capsys):
    root = str(tmp_path / "data")
    deliver_searches(root, keys.open())
    previous = os.umask(0)
    try:
        run_decrypt(root, keys, "clear", capsys)
        assert private_modes(f"{root}/clear") == {}
        os.chmod(f"{root}/clear/search", 0o755)  # an earlier run's folder and file, too open: tightened
        os.chmod(clear_file(root, "clear", "00"), 0o644)
        run_decrypt(root, keys, "clear", capsys)
    finally:
        os.umask(previous)
    assert private_modes(f"{root}/clear") == {}


def private_modes(output_root: str) -> dict[str, int]:
    """The output root, and the folders and files under it, whose mode is not 0700 (folders) or 0600 (files)."""
    paths = [output_root] + [os.path.join(f, n) for f, folders, names in os.walk(output_root) for n in folders + names]
    assert len(paths) == 3 + 3 + 3, "root, type, day, 3 hours, 3 files"
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in paths}
    return {path: oct(mode) for path, mode in modes.items() if mode != (0o700 if os.path.isdir(path) else 0o600)}
