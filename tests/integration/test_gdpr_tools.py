"""The forget command and its batch job, and the decrypt command, as an operator runs them."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import pytest

from event_delivery.contract.dead_letters import quarantine_key_name
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.kek import LocalKeyFile
from event_delivery.keys.rotation import RewrapCounts
from event_delivery.keys.sqlite import SqliteKeystore
from pipelines import forget, rewrap


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_forget_subjects_from_the_command_line_and_from_a_file(tmp_path):
    kek_path, db = tmp_path / "kek.key", tmp_path / "keys.db"
    keystore = KeyConfig(f"sqlite:///{db}", str(kek_path)).provision()
    subjects = [f"user-{i}" for i in range(250)]
    keystore.subject_keys(subjects, scope="search")
    keystore.subject_keys(subjects[:100], scope="play")
    key_flags = [f"--keystore=sqlite:///{db}", f"--local_key_file={kek_path}"]

    one = run("pipelines.forget", "--subject", "user-0", *key_flags)
    assert one.returncode == 0, one.stderr
    assert "1 subject(s) whose keys were deleted" in one.stdout and "user-0" not in one.stdout + one.stderr

    listing = tmp_path / "requests.txt"
    listing.write_text("\n".join(subjects[1:200] + ["", "never-seen"]) + "\n")
    batch = run("pipelines.forget", "--subjects_file", str(listing), *key_flags)
    assert batch.returncode == 0, batch.stderr
    assert "199 subject(s) whose keys were deleted, 1 subject(s) had no key" in batch.stdout
    assert "user-1" not in batch.stdout + batch.stderr

    for scope in ("search", "play", "page_view"):
        after = keystore.subject_keys(subjects + ["never-seen"], scope=scope)
        assert sorted(s for s, key in after.items() if key is not None) == sorted(subjects[200:]), scope


def decrypt_command(tmp_path, start, *extra):
    (tmp_path / "delivered").mkdir(exist_ok=True)
    return run(
        "pipelines.decrypt",
        "--event_type",
        "search",
        "--input_root",
        str(tmp_path / "delivered"),
        "--output_root",
        str(tmp_path / "clear"),
        "--start",
        start,
        "--end",
        "2026-11-30T00",
        *extra,
    )


def test_decrypt_command_explains_bad_flags_in_one_line(tmp_path):
    result = decrypt_command(tmp_path, "yesterday")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error:" in result.stderr


def test_decrypt_command_with_nothing_to_do(tmp_path):
    key_flags = (f"--keystore=sqlite:///{tmp_path}/k.db", f"--local_key_file={tmp_path}/kek.key")
    result = decrypt_command(tmp_path, "2026-11-29T00", *key_flags)
    assert result.returncode == 0 and "no search files" in result.stdout


def provisioned_keys(tmp_path):
    keys = KeyConfig(f"sqlite:///{tmp_path}/keys/keystore.db", str(tmp_path / "keys" / "kek.key"))
    return keys, keys.provision(), [f"--keystore={keys.keystore}", f"--local_key_file={keys.local_key_file}"]


def test_rewrap_rotates_the_local_key_rewraps_every_key_and_destroys_the_old_version(tmp_path):
    keys, keystore, key_flags = provisioned_keys(tmp_path)
    before = keystore.subject_keys(["user-1", "user-2"])
    quarantine = keystore.named_key("quarantine/search")

    result = run("pipelines.rewrap", "--rotate_local_key", "--destroy_kek_version", "1", *key_flags)
    assert result.returncode == 0, result.stderr
    assert "version 2 is the primary" in result.stdout
    assert (
        "rotated: 1 key-wrapping key(s) replaced by new ones under version 2 and deleted; 4 key(s) re-wrapped"
        in result.stdout
    ), "user-1's, user-2's, the quarantine key and the pseudonyms' secret"
    assert "version 1 of the key-encryption key destroyed" in result.stdout
    assert "keys per KEK version: 2: 1" in result.stdout
    assert LocalKeyFile(keys.local_key_file).versions == [2]

    reopened = keys.check()
    assert reopened.subject_keys(["user-1", "user-2"], create=False) == before
    assert reopened.named_key("quarantine/search") == quarantine
    forget = run("pipelines.forget", "--subject", "user-1", *key_flags)
    assert forget.returncode == 0 and "1 subject(s) whose keys were deleted" in forget.stdout, forget.stderr
    assert keys.check().subject_keys(["user-1", "user-2"], create=False) == {"user-1": None, "user-2": before["user-2"]}


def test_rewrap_refuses_to_destroy_a_version_that_still_wraps_a_key(tmp_path, monkeypatch, capsys):
    keys, keystore, key_flags = provisioned_keys(tmp_path)
    keystore.subject_keys(["user-1"])
    monkeypatch.setattr(SqliteKeystore, "rewrap", lambda self: RewrapCounts())  # as if a job wrapped one meanwhile
    with pytest.raises(SystemExit) as exit_:
        rewrap.main(["--rotate_local_key", "--destroy_kek_version", "1", *key_flags])
    assert exit_.value.code == 2
    assert "version 1 still wraps 1 key(s): run rewrap again" in capsys.readouterr().err
    assert LocalKeyFile(keys.local_key_file).versions == [1, 2]
    assert keystore.kek_versions() == {1: 1}
    assert keys.check().subject_keys(["user-1"], create=False)["user-1"] is not None


def test_rewrap_and_forget_stop_in_one_line_when_the_keys_were_not_provisioned(tmp_path):
    key_flags = [f"--keystore=sqlite:///{tmp_path}/keys/keystore.db", f"--local_key_file={tmp_path}/keys/kek.key"]
    for command in (["pipelines.rewrap"], ["pipelines.forget", "--sweep_orphans"]):
        result = run(*command, *key_flags)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert "there is no key-encryption key file" in line and "make provision" in line
    LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)
    result = run("pipelines.rewrap", *key_flags)
    assert result.returncode == 2 and "there is no keystore" in result.stderr
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["kek.key"], "neither created anything"


def test_forget_sweeps_keys_nothing_points_to_and_quarantine_keys_past_the_retention(tmp_path):
    keys, keystore, key_flags = provisioned_keys(tmp_path)
    keystore.subject_keys(["user-1", "user-2"])
    with keystore._transaction() as db:
        db.execute("INSERT INTO data_keys VALUES (?, ?)", ("orphan", keystore._wrap_key("orphan", b"o" * 32)))
    old = keystore.named_key(quarantine_key_name("search", 946_684_800_000))  # 2000-01-01
    today = keystore.named_key(quarantine_key_name("search", int(time.time() * 1000)))
    result = run("pipelines.forget", "--sweep_orphans", *key_flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "swept: 1 key(s) that nothing pointed to deleted; 1 quarantine key(s) of days past the 30-day retention deleted"
    )
    assert keystore.data_keys(["orphan", old.key_id, today.key_id]) == {
        "orphan": None,
        old.key_id: None,
        today.key_id: today.data_key,
    }
    assert all(keystore.subject_keys(["user-1", "user-2"], create=False).values())

    both = run("pipelines.forget", "--subject", "user-1", "--sweep_orphans", *key_flags)
    assert both.returncode == 0, both.stderr
    assert "1 subject(s) whose keys were deleted" in both.stdout and "swept: 0 key(s)" in both.stdout
    nothing = run("pipelines.forget", *key_flags)
    assert nothing.returncode == 2 and "--sweep_orphans" in nothing.stderr


def test_make_sweep_keys_runs_the_sweep(tmp_path):
    keys, keystore, key_flags = provisioned_keys(tmp_path)
    keystore.subject_keys(["user-1"])
    make = ["make", "--no-print-directory", "sweep-keys", "INSTALLED=", f"PY={sys.executable}"]
    make += [f"STATE_DIR={tmp_path}/no-emulators", f"KEY_ARGS={' '.join(key_flags)}"]
    result = subprocess.run(make, cwd=pathlib.Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "swept: 0 key(s) that nothing pointed to deleted" in result.stdout


# Subject ids come from requests anyone can send: none of these may run anything.
HOSTILE_VALUES = ['"; touch {marker}; "', "`touch {marker}`", "$(touch {marker})", "'; touch {marker}; '"]
HOSTILE_VALUES += ["$(shell touch {marker})", "a $$(touch {marker}) b"]


@pytest.mark.parametrize("variable", ["SUBJECT", "FILE", "COPIES"])
def test_make_forget_hands_any_value_to_forget_as_it_is_and_runs_none(tmp_path, variable):
    marker, show_args = tmp_path / "injected", tmp_path / "show-args"
    show_args.write_text('#!/bin/sh\nfor arg; do printf "[%s]\\n" "$arg"; done\n')
    show_args.chmod(0o755)
    flag = {"SUBJECT": "--subject", "FILE": "--subjects_file", "COPIES": "--decrypted_copies"}[variable]
    for template in HOSTILE_VALUES:
        value = template.format(marker=marker)
        make = ["make", "--no-print-directory", "forget", "INSTALLED=", f"PY={show_args}"]
        make += [
            f"STATE_DIR={tmp_path}/no-emulators",
            f"{variable}={value}",
            *(["FILE=-"] if variable == "COPIES" else []),
        ]
        result = subprocess.run(make, cwd=pathlib.Path(__file__).parents[2], capture_output=True, text=True, timeout=60)
        assert not marker.exists(), f"{value} ran"
        assert result.returncode == 0, result.stderr
        args = result.stdout.splitlines()
        assert args[args.index(f"[{flag}]") + 1] == f"[{value}]", "handed on whole, unexpanded"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_the_commands_refuse_a_keystore_url_that_names_no_file(url, tmp_path, monkeypatch, capsys):
    from tools.ops import provision

    monkeypatch.setattr(provision, "apply_plan", lambda *args: [])  # topics and buckets: not this test's
    LocalKeyFile(tmp_path / "kek.key", create=True)
    key_flags = ["--keystore", url, "--local_key_file", str(tmp_path / "kek.key")]
    for command in (
        lambda: forget.main(["--sweep_orphans", *key_flags]),
        lambda: rewrap.main(key_flags),
        lambda: provision.main(["--project", "local-project", *key_flags]),
    ):
        with pytest.raises(SystemExit) as exit_:
            command()
        assert exit_.value.code == 2
        assert f"the keystore '{url}' names no file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["kek.key"], "nothing was created"
