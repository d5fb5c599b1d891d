"""What operators and developers run around the jobs: provisioning, deploys, audits, alerts and
the report (``tools.ops``), and the local emulators, load and demo (``tools.local``). The top
layer: it imports the jobs (``pipelines``) and everything below; nothing imports it."""
