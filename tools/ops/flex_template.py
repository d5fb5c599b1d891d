"""Build the delivery job's Flex Template: its image from ./Dockerfile and its spec file.

    python -m tools.ops.flex_template --project my-project --region europe-west1 \\
        --bucket my-bucket [--image <region>-docker.pkg.dev/<project>/event-delivery/delivery:<tag>] [--dry_run]

It writes the metadata (``template_metadata``: every flag of the job, with its help text),
builds and pushes the image with Cloud Build (no local Docker needed), and writes the
template spec to ``gs://<bucket>/templates/delivery.json``, from which ``make deploy
TEMPLATE=...`` launches. ``--dry_run`` writes the metadata and prints the commands only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from tools.ops.template_metadata import template_metadata

DEFAULT_METADATA_FILE = ".template/metadata.json"


def default_image(project: str, region: str) -> str:
    """The image in the project's Artifact Registry repository ``event-delivery``."""
    return f"{region}-docker.pkg.dev/{project}/event-delivery/delivery:latest"


def default_template(bucket: str) -> str:
    return f"gs://{bucket}/templates/delivery.json"


def build_commands(project: str, region: str, image: str, template: str, metadata_file: str) -> list[list[str]]:
    """Build and push the image, then write the template spec that names it and holds the metadata."""
    return [
        ["gcloud", "builds", "submit", f"--project={project}", f"--region={region}", f"--tag={image}", "."],
        [
            "gcloud",
            "dataflow",
            "flex-template",
            "build",
            template,
            f"--project={project}",
            f"--image={image}",
            "--sdk-language=PYTHON",
            f"--metadata-file={metadata_file}",
        ],
    ]


def write_metadata(path: str) -> None:
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(template_metadata(), indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ops.flex_template", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--bucket", required=True, help="Where the template spec goes, without gs://.")
    parser.add_argument("--image", help="Default: <region>-docker.pkg.dev/<project>/event-delivery/delivery:latest")
    parser.add_argument("--metadata_file", default=DEFAULT_METADATA_FILE, help=f"Default: {DEFAULT_METADATA_FILE}")
    parser.add_argument("--dry_run", action="store_true", help="Write the metadata; print the build commands only.")
    args = parser.parse_args(argv)
    image = args.image or default_image(args.project, args.region)
    write_metadata(args.metadata_file)
    print(f"metadata {args.metadata_file}")
    for command in build_commands(args.project, args.region, image, default_template(args.bucket), args.metadata_file):
        if args.dry_run:
            print("would run: " + " ".join(command))
        else:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
