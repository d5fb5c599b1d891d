"""The forget command and its batch job, and the decrypt command, as an operator runs them."""

from __future__ import annotations

import subprocess
import sys

from event_delivery.keys.kek import LocalKeyFile
from event_delivery.keys.sqlite import SqliteKeystore


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_forget_subjects_from_the_command_line_and_from_a_file(tmp_path):
    kek_path, db = tmp_path / "kek.key", tmp_path / "keys.db"
    keystore = SqliteKeystore(LocalKeyFile(kek_path), str(db))
    subjects = [f"user-{i}" for i in range(250)]
    keystore.subject_keys(subjects)
    key_flags = [f"--keystore=sqlite:///{db}", f"--local_key_file={kek_path}"]

    one = run("pipelines.forget", "--subject", "user-0", *key_flags)
    assert one.returncode == 0, one.stderr
    assert "1 key(s) deleted" in one.stdout and "user-0" not in one.stdout + one.stderr

    listing = tmp_path / "requests.txt"
    listing.write_text("\n".join(subjects[1:200] + ["", "never-seen"]) + "\n")
    batch = run("pipelines.forget", "--subjects_file", str(listing), *key_flags)
    assert batch.returncode == 0, batch.stderr
    assert "199 key(s) deleted, 1 subject(s) had no key" in batch.stdout
    assert "user-1" not in batch.stdout + batch.stderr

    after = keystore.subject_keys(subjects + ["never-seen"])
    assert sorted(s for s, key in after.items() if key is not None) == sorted(subjects[200:])


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
