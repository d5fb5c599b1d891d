"""The worker service account, and its roles on each planned resource (``roles``).

A role is added to a resource's policy where the account lacks it, read and written back
with the policy's etag, so a concurrent change is refused rather than overwritten; a policy
that already grants every planned role is not written at all.
"""

from __future__ import annotations

from google.cloud import iam_admin_v1, resourcemanager_v3
from google.iam.v1 import iam_policy_pb2, policy_pb2

from tools.ops.provisioning.changes import UNCHANGED, UPDATED, Change, create_unless_exists
from tools.ops.provisioning.plan import WORKER_ACCOUNT_ID, Grant

POLICY_VERSION = 3  # reads conditional bindings too, so writing the policy back keeps them


def service_account_request(project: str) -> iam_admin_v1.CreateServiceAccountRequest:
    return iam_admin_v1.CreateServiceAccountRequest(
        name=f"projects/{project}",
        account_id=WORKER_ACCOUNT_ID,
        service_account=iam_admin_v1.ServiceAccount(
            display_name="Event Delivery worker",
            description="Runs the delivery and auditor jobs; holds roles on their own resources only",
        ),
    )


def ensure_service_account(iam_client, project: str, email: str) -> Change:
    request = service_account_request(project)
    return create_unless_exists(lambda: iam_client.create_service_account(request=request), "service account", email)


def project_number(projects_client, project: str) -> str:
    """The project's number, which names its service agents."""
    request = resourcemanager_v3.GetProjectRequest(name=f"projects/{project}")
    return projects_client.get_project(request=request).name.rpartition("/")[2]


def with_roles(policy: policy_pb2.Policy, roles: tuple[str, ...], members: tuple[str, ...]) -> bool:
    """Adds ``members`` to each of ``roles`` in ``policy`` (unconditional bindings only); True if it added any."""
    added = False
    for role in roles:
        binding = next((b for b in policy.bindings if b.role == role and not b.HasField("condition")), None)
        if binding is None:
            binding = policy.bindings.add(role=role)
        for member in members:
            if member not in binding.members:
                binding.members.append(member)
                added = True
    return added


def get_policy_request(resource: str) -> iam_policy_pb2.GetIamPolicyRequest:
    request = iam_policy_pb2.GetIamPolicyRequest(resource=resource)
    request.options.requested_policy_version = POLICY_VERSION
    return request


def grant(client, grant: Grant, members: tuple[str, ...]) -> Change:
    """Grants ``grant.roles`` through a client with the standard ``get_iam_policy``/``set_iam_policy``
    (Pub/Sub, KMS, Bigtable admin, Resource Manager)."""
    policy = client.get_iam_policy(request=get_policy_request(grant.resource))
    name = f"{', '.join(grant.roles)} on {grant.kind} {grant.resource}"
    if not with_roles(policy, grant.roles, members):
        return Change(UNCHANGED, "grant", name)
    policy.version = POLICY_VERSION
    client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=grant.resource, policy=policy))
    return Change(UPDATED, "grant", name)


def grant_on_bucket(storage_client, grant: Grant, members: tuple[str, ...]) -> Change:
    """Cloud Storage keeps its own policy type (a list of role/members dicts)."""
    bucket = storage_client.bucket(grant.resource)
    policy = bucket.get_iam_policy(requested_policy_version=POLICY_VERSION)
    name = f"{', '.join(grant.roles)} on bucket gs://{grant.resource}"
    unconditional = [binding for binding in policy.bindings if not binding.get("condition")]
    held = {(binding["role"], member) for binding in unconditional for member in binding["members"]}
    missing = [(role, member) for role in grant.roles for member in members if (role, member) not in held]
    if not missing:
        return Change(UNCHANGED, "grant", name)
    policy.bindings.extend({"role": role, "members": {member}} for role, member in missing)
    bucket.set_iam_policy(policy)
    return Change(UPDATED, "grant", name)
