"""Re-wrap every stored key under the key-encryption key's primary version, so older versions can be destroyed.

Each key the KEK wraps records the KEK version that wrapped it: the monthly key-wrapping
keys, which wrap every data key (and data keys stored before there were any). Rotating
the KEK makes a new primary version; this tool then re-wraps every key still under an
older one, beside running jobs and forget (a key deleted meanwhile stays deleted), and
prints how many keys each version still wraps. A version that wraps none can be
destroyed, which makes any copy of the keystore taken before the rotation unreadable.

With Cloud KMS, which keeps the versions::

    gcloud kms keys versions create --primary --key subject-keys --keyring event-delivery --location europe-west1
    python -m pipelines.rewrap --keystore bigtable://my-project/event-delivery/subject-keys --kms_key projects/...
    gcloud kms keys versions destroy 1 --key subject-keys --keyring event-delivery --location europe-west1

With a local key file, this tool rotates and destroys too (restart local jobs after a rotation:
they keep wrapping under the version they loaded)::

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
    counts = keystore.rewrap()
    print(
        f"re-wrapped: {counts.rewrapped} key(s) under version {keystore.kek.primary_version()}; "
        f"{counts.current} needed nothing (under it already, or wrapped by a key-wrapping key); "
        f"{counts.vanished} deleted meanwhile"
    )
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
