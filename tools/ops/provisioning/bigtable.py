"""The keystore's Bigtable instance and table, with the one column family the keystore reads.

The emulator serves every instance and implements no instance admin, so there only the table is
made. The table's family keeps one version per cell: the keystore never reads an older one, and a
deleted key must leave no older copy behind (``event_delivery/keys/bigtable.py``).
"""

from __future__ import annotations

import os

from google.api_core import exceptions
from google.cloud import bigtable_admin_v2 as admin

from event_delivery.cloud.clients import BIGTABLE_EMULATOR_HOST
from tools.ops.provisioning.changes import UNCHANGED, Change, create_unless_exists, created_or_unchanged
from tools.ops.provisioning.plan import BigtableTable

SERVE_NODES = 1  # a keystore is small; Bigtable's autoscaling or the console grows it


def instance_request(table: BigtableTable) -> admin.CreateInstanceRequest:
    if not table.zone:
        raise ValueError("creating a Bigtable instance needs a zone: pass --region or --bigtable_zone")
    cluster = admin.Cluster(
        location=f"projects/{table.project}/locations/{table.zone}",
        serve_nodes=SERVE_NODES,
        default_storage_type=admin.StorageType.SSD,
    )
    return admin.CreateInstanceRequest(
        parent=f"projects/{table.project}",
        instance_id=table.instance,
        instance=admin.Instance(display_name=table.instance, type_=admin.Instance.Type.PRODUCTION),
        clusters={f"{table.instance}-c1": cluster},
    )


def table_request(table: BigtableTable) -> admin.CreateTableRequest:
    family = admin.ColumnFamily(gc_rule=admin.GcRule(max_num_versions=1))
    return admin.CreateTableRequest(
        parent=table.instance_path, table_id=table.table, table=admin.Table(column_families={table.family: family})
    )


def ensure_instance(instance_admin, table: BigtableTable) -> Change:
    if os.environ.get(BIGTABLE_EMULATOR_HOST):
        return Change(UNCHANGED, "bigtable instance", f"{table.instance_path} (the emulator serves every instance)")
    try:
        instance_admin.get_instance(request=admin.GetInstanceRequest(name=table.instance_path))
        return created_or_unchanged(False, "bigtable instance", table.instance_path)
    except exceptions.NotFound:
        pass
    instance_admin.create_instance(request=instance_request(table)).result()
    return created_or_unchanged(True, "bigtable instance", table.instance_path)


def ensure_table(table_admin, table: BigtableTable) -> Change:
    return create_unless_exists(
        lambda: table_admin.create_table(request=table_request(table)), "bigtable table", table.path
    )
