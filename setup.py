"""Event Delivery: per-type Beam jobs from Pub/Sub to hourly, deduplicated Avro on GCS.

Dataflow workers install this package (``--setup_file ./setup.py``), so it carries
every module the jobs import and the schema registry as package data.
"""

import setuptools

setuptools.setup(
    name="event-delivery",
    version="0.1.0",
    description="Per-type Apache Beam jobs delivering Pub/Sub events into hourly Avro partitions.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["avro_schemas", "event_delivery*", "gateway", "pipelines", "tools*", "transforms"]
    ),
    package_data={"avro_schemas": ["*.avsc"], "tools.ops": ["report.css"]},
    install_requires=[
        "apache-beam[gcp]==2.77.0",
        "cryptography==50.0.2",
        "fastavro==1.13.1",
        # fastavro's codecs beside deflate (--codec): snappy through cramjam, zstandard through backports.zstd
        "cramjam==2.14.0",
        'backports.zstd==1.8.0; python_version < "3.14"',
        "google-cloud-bigtable==2.50.2",
        "google-cloud-iam==2.27.0",  # make provision: the worker service account
        "google-cloud-kms==3.18.0",
        "google-cloud-monitoring==2.32.0",  # make monitoring: alert policies
        "google-cloud-monitoring-dashboards==3.2.0",  # make monitoring: dashboards
        "google-cloud-storage==3.17.1",
        "google-cloud-pubsub==2.44.0",
        "google-cloud-resource-manager==1.19.0",  # make provision: the worker's role on the project
        "aiohttp==3.14.5",  # the gateway's HTTP server
        "prometheus-client==0.26.0",  # the gateway's /metrics
    ],
    extras_require={
        "dev": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",  # make test: the suite on two processes
            "avro==1.12.2",
            "python-snappy==0.7.3",  # the Apache Avro reader's snappy (its zstandard is zstandard, pinned)
            "hypothesis==6.170.15",
            "ruff==0.17.6",
            "import-linter==2.17",  # make lint: imports only go down
            "gcp-storage-emulator==2026.7.19",
            "matplotlib==3.10.9",  # make bench's chart
            "orjson==3.13.0",  # make bench: the plain loop and the floor parse with it (Beam's gcp extra has it too)
            "promql-parser==0.11.0",  # checks the PromQL of make monitoring's alerts
            "playwright==1.65.2",  # drives Debian's chromium in the report's browser test
            "mutmut==3.8.1",  # make mutants
        ],
    },
)
