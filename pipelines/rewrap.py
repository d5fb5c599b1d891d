"""Rotate the key-wrapping keys and re-wrap every stored key, so that older KEK versions can be destroyed.

The KEK wraps the monthly key-wrapping keys, which wrap every data key. After the KEK's
rotation (a new primary version), this tool makes a new generation of every key-wrapping
key under that primary, re-wraps every data key under its month's new one (and the keys
the KEK wraps itself under an older version, under the primary), and only then deletes the
old key-wrapping keys; it prints how many keys each KEK version still wraps. It runs beside
jobs and forget: a job never stores a key under a key-wrapping key it replaced, and a key
deleted meanwhile stays deleted. A run that stops leaves every key readable; run it again
to finish (each run rotates whatever key-wrapping keys it finds). One runs at a time: a second
run while one holds the rotation's lease stops with a message (the lease of a run that died
lapses within ten minutes).

What it revokes: a copy of the keystore taken before the run holds its data keys wrapped by
key-wrapping keys that no longer exist, and those wrapped by the KEK versions of then. Once
every version older than the primary is destroyed, nothing unwraps any key of the copy, the
keys of subjects forgotten since included. Until then, the copy still opens with those
versions: destroy them.

With Cloud KMS, which keeps the versions::

    gcloud kms keys versions create --primary --key subject-keys --keyring event-delivery --location europe-west1
    python -m pipelines.rewrap --keystore bigtable://my-project/event-delivery/subject-keys --kms_key projects/...
    gcloud kms keys versions destroy 1 --key subject-keys --keyring event-delivery --location europe-west1

With a local key file, this tool rotates and destroys too (restart local jobs after a rotation:
they read the new version when they first meet a key it wraps, but wrap under the one they loaded)::

    python -m pipelines.rewrap --rotate_local_key
    python -m pipelines.rewrap --destroy_kek_version 1

It never creates a keystore or a KEK, and prints counts only.
"""

from __future__ import annotations

import argparse
import sys

from event_delivery.cloud import preflight
from event_delivery.keys.config import add_key_arguments, key_config_from_args
from event_delivery.keys.kek import LocalKeyFile
from event_delivery.keys.rotation import RotationUnderWay


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.rewrap", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rotate_local_key",
        action="store_true",
        help="First add a new version to --local_key_file and make it the primary (with Cloud KMS, rotate with "
        "`gcloud kms keys versions create --primary`).",
    )
    parser.add_argument(
        "--destroy_kek_version",
        type=int,
        metavar="VERSION",
        help="After re-wrapping, delete this version from --local_key_file; refused while any stored key is "
        "still wrapped under it (with Cloud KMS, destroy with `gcloud kms keys versions destroy`).",
    )
    add_key_arguments(parser)
    args = parser.parse_args(argv)
    try:
        keys = key_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if keys.kms_key and (args.rotate_local_key or args.destroy_kek_version is not None):
        parser.error("Cloud KMS keeps its own versions: rotate and destroy them with gcloud kms")
    with preflight.exit_on_failure(parser.prog):
        keystore = keys.preflight()
    if args.rotate_local_key:
        print(f"key-encryption key rotated: version {keystore.kek.rotate()} is the primary")
    try:
        counts = keystore.rewrap()
    except RotationUnderWay as error:
        preflight.fail(parser.prog, str(error))
    print(
        f"rotated: {counts.retired} key-wrapping key(s) replaced by new ones under version "
        f"{keystore.kek.primary_version()} and deleted; {counts.rewrapped} key(s) re-wrapped; "
        f"{counts.vanished} deleted meanwhile"
    )
    if counts.unreadable:
        print(f"{counts.unreadable} key(s) no longer unwrap (their key-wrapping key or KEK version is gone)")
    in_use = keystore.kek_versions()
    if args.destroy_kek_version is not None:
        version = args.destroy_kek_version
        if in_use.get(version):
            preflight.fail(parser.prog, f"version {version} still wraps {in_use[version]} key(s): run rewrap again")
        try:
            LocalKeyFile(keys.local_key_file).destroy_version(version)
        except ValueError as error:
            preflight.fail(parser.prog, str(error))
        print(f"version {version} of the key-encryption key destroyed")
    print("keys per KEK version: " + (", ".join(f"{v}: {n}" for v, n in sorted(in_use.items())) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
