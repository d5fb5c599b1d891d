"""In-memory stand-ins for the Google clients that provisioning calls, for what no emulator serves
(KMS, IAM, Bigtable's instance admin, Resource Manager). Each checks that it is handed the client
library's own request type, keeps what was created, and answers as the service would a second time."""

from __future__ import annotations

import copy
import dataclasses

from google.api_core import exceptions, iam
from google.cloud import bigtable_admin_v2, iam_admin_v1, kms, resourcemanager_v3
from google.iam.v1 import iam_policy_pb2, policy_pb2


class PolicyHolder:
    """``get_iam_policy`` / ``set_iam_policy`` as Pub/Sub, KMS, Bigtable and Resource Manager offer them."""

    def __init__(self):
        self.policies: dict[str, policy_pb2.Policy] = {}
        self.set_requests: list[iam_policy_pb2.SetIamPolicyRequest] = []

    def get_iam_policy(self, request):
        assert isinstance(request, iam_policy_pb2.GetIamPolicyRequest)
        return copy.deepcopy(self.policies.get(request.resource, policy_pb2.Policy()))

    def set_iam_policy(self, request):
        assert isinstance(request, iam_policy_pb2.SetIamPolicyRequest)
        self.set_requests.append(request)
        self.policies[request.resource] = request.policy
        return request.policy


class Creates:
    """Remembers the names it created; a second create of one raises ``AlreadyExists``."""

    def __init__(self):
        self.created: dict[str, object] = {}

    def _create(self, name: str, request) -> None:
        if name in self.created:
            raise exceptions.AlreadyExists(name)
        self.created[name] = request


class CreatesWithPolicies(PolicyHolder, Creates):
    def __init__(self):
        PolicyHolder.__init__(self)
        Creates.__init__(self)


class FakePubsub(CreatesWithPolicies):
    def create_topic(self, name):
        self._create(name, name)

    def create_subscription(self, request):
        self._create(request["name"], request)


@dataclasses.dataclass
class FakeBucket:
    name: str
    lifecycle_rules: list = dataclasses.field(default_factory=list)
    patches: int = 0
    policy: iam.Policy = dataclasses.field(default_factory=iam.Policy)
    policy_writes: int = 0

    def patch(self):
        self.patches += 1

    def get_iam_policy(self, requested_policy_version):
        return copy.deepcopy(self.policy)

    def set_iam_policy(self, policy):
        self.policy, self.policy_writes = policy, self.policy_writes + 1


class FakeStorage:
    def __init__(self):
        self.buckets: dict[str, FakeBucket] = {}

    def create_bucket(self, name):
        if name in self.buckets:
            raise exceptions.Conflict(name)
        self.buckets[name] = FakeBucket(name)

    def get_bucket(self, name):
        return self.buckets[name]

    bucket = get_bucket


class FakeKms(CreatesWithPolicies):
    def __init__(self):
        super().__init__()
        self.updates: list[kms.UpdateCryptoKeyRequest] = []

    def create_key_ring(self, request):
        assert isinstance(request, kms.CreateKeyRingRequest)
        self._create(f"{request.parent}/keyRings/{request.key_ring_id}", request)

    def create_crypto_key(self, request):
        assert isinstance(request, kms.CreateCryptoKeyRequest)
        self._create(f"{request.parent}/cryptoKeys/{request.crypto_key_id}", request)

    def get_crypto_key(self, request):
        assert isinstance(request, kms.GetCryptoKeyRequest)
        created = self.created[request.name].crypto_key
        return kms.CryptoKey(name=request.name, rotation_period=created.rotation_period)

    def update_crypto_key(self, request):
        assert isinstance(request, kms.UpdateCryptoKeyRequest)
        self.updates.append(request)


class _Done:
    def result(self):
        return None


class FakeInstanceAdmin(Creates):
    def get_instance(self, request):
        assert isinstance(request, bigtable_admin_v2.GetInstanceRequest)
        if request.name not in self.created:
            raise exceptions.NotFound(request.name)

    def create_instance(self, request):
        assert isinstance(request, bigtable_admin_v2.CreateInstanceRequest)
        self._create(f"{request.parent}/instances/{request.instance_id}", request)
        return _Done()


class FakeTableAdmin(CreatesWithPolicies):
    def create_table(self, request):
        assert isinstance(request, bigtable_admin_v2.CreateTableRequest)
        self._create(f"{request.parent}/tables/{request.table_id}", request)


@dataclasses.dataclass
class FakeBigtable:
    instance_admin_client: FakeInstanceAdmin = dataclasses.field(default_factory=FakeInstanceAdmin)
    table_admin_client: FakeTableAdmin = dataclasses.field(default_factory=FakeTableAdmin)


class FakeProjects(PolicyHolder):
    NUMBER = "123456789012"

    def get_project(self, request):
        assert isinstance(request, resourcemanager_v3.GetProjectRequest)
        return resourcemanager_v3.Project(name=f"projects/{self.NUMBER}", project_id=request.name.split("/")[1])


class FakeIam(Creates):
    def create_service_account(self, request):
        assert isinstance(request, iam_admin_v1.CreateServiceAccountRequest)
        self._create(f"{request.name}/serviceAccounts/{request.account_id}", request)


@dataclasses.dataclass
class FakeCloud:
    """One fake per client a plan uses; ``clients()`` hands them to ``apply_plan``."""

    pubsub: FakePubsub = dataclasses.field(default_factory=FakePubsub)
    storage: FakeStorage = dataclasses.field(default_factory=FakeStorage)
    kms: FakeKms = dataclasses.field(default_factory=FakeKms)
    bigtable: FakeBigtable = dataclasses.field(default_factory=FakeBigtable)
    iam: FakeIam = dataclasses.field(default_factory=FakeIam)
    projects: FakeProjects = dataclasses.field(default_factory=FakeProjects)

    def clients(self):
        from tools.ops.provisioning.apply import Clients

        return Clients(
            publisher=lambda: self.pubsub,
            subscriber=lambda: self.pubsub,
            storage=lambda project: self.storage,
            kms=lambda: self.kms,
            bigtable=lambda project: self.bigtable,
            iam=lambda: self.iam,
            projects=lambda: self.projects,
        )
