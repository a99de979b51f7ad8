"""A recording stand-in for azure.ai.ml.MLClient, plus the settings and credentials the Azure tests share.

The Azure backend is tested through the real MLClient over HTTPS against tests/azure_standin.py
(test_azure_wire.py). This fake is kept only where the wire cannot reach or need not go:
test_azure_workflow.py (steps that must send nothing: no data, no recorded job, a refused credential;
and a deployment whose final state is not Succeeded although its operation succeeded, which the
stand-in does not produce) and test_azure_preflight.py (the role, quota and identity checks' own
logic, fed directly). Unlike the real SDK it never raises for an operation that ends Failed.

It keeps the entities it is given (the SDK's own objects, deep-copied), answers `get` with them or
with the SDK's ResourceNotFoundError, returns poller-like objects from `begin_*`, and records every
call in order in `calls` so tests can assert what happened and in which sequence. Behaviour knobs:

- `deployment_state` / `endpoint_state`: the provisioning state a finished operation reports;
- `job_status`: what `jobs.get` reports after `jobs.stream`;
- `errors["group.method"] = exc`: raise `exc` from that call (quota, auth, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError


@dataclass
class Call:
    group: str
    method: str
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return f"{self.group}.{self.method}"

    @property
    def entity(self) -> Any:
        return self.args[0] if self.args else None


class FakePoller:
    def __init__(self, client: "FakeMLClient", name: str, result: Any = None) -> None:
        self._client, self._name, self._result = client, name, result

    def result(self, timeout: float | None = None) -> Any:
        self._client.calls.append(Call("poller", "result", (self._name,), {}))
        return self._result

    def wait(self, timeout: float | None = None) -> None:
        self.result(timeout)

    def done(self) -> bool:
        return True


class _Ops:
    group = ""

    def __init__(self, client: "FakeMLClient") -> None:
        self._c = client

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._c.calls.append(Call(self.group, method, args, kwargs))
        error = self._c.errors.get(f"{self.group}.{method}")
        if error is not None:
            raise error

    def _not_found(self, what: str) -> ResourceNotFoundError:
        return ResourceNotFoundError(message=f"{what} not found (fake)")


class ComputeOps(_Ops):
    group = "compute"

    def get(self, name: str) -> Any:
        self._record("get", name)
        if name not in self._c.computes:
            raise self._not_found(f"compute {name}")
        return copy.deepcopy(self._c.computes[name])

    def begin_create_or_update(self, compute: Any) -> FakePoller:
        self._record("begin_create_or_update", compute)
        self._c.computes[compute.name] = copy.deepcopy(compute)
        return FakePoller(self._c, f"compute:{compute.name}", copy.deepcopy(compute))

    def list_sizes(self, **kwargs: Any) -> list:
        self._record("list_sizes", **kwargs)
        return list(self._c.sizes)

    def list_usage(self, **kwargs: Any) -> list:
        self._record("list_usage", **kwargs)
        return list(self._c.usages)


class EnvironmentOps(_Ops):
    group = "environments"

    def create_or_update(self, env: Any) -> Any:
        self._record("create_or_update", env)
        return copy.deepcopy(env)


class JobOps(_Ops):
    group = "jobs"

    def create_or_update(self, job: Any, **kwargs: Any) -> Any:
        self._record("create_or_update", job, **kwargs)
        self._c.job_counter += 1
        name = f"fake-job-{self._c.job_counter}"
        self._c.submitted_jobs[name] = job
        return SimpleNamespace(name=name, studio_url=f"https://ml.azure.com/runs/{name}", status="Queued")

    def stream(self, name: str) -> None:
        self._record("stream", name)

    def get(self, name: str) -> Any:
        self._record("get", name)
        if name not in self._c.submitted_jobs:
            raise self._not_found(f"job {name}")
        return SimpleNamespace(name=name, status=self._c.job_status)


class ModelOps(_Ops):
    group = "models"

    def create_or_update(self, model: Any) -> Any:
        self._record("create_or_update", model)
        version = str(len([c for c in self._c.calls if c.name == "models.create_or_update"]))
        registered = copy.deepcopy(model)
        registered.version = version
        return registered


class EndpointOps(_Ops):
    group = "online_endpoints"

    def get(self, name: str) -> Any:
        self._record("get", name)
        if name not in self._c.endpoints:
            raise self._not_found(f"endpoint {name}")
        return copy.deepcopy(self._c.endpoints[name])

    def begin_create_or_update(self, endpoint: Any) -> FakePoller:
        self._record("begin_create_or_update", copy.deepcopy(endpoint))
        stored = copy.deepcopy(endpoint)
        stored._provisioning_state = self._c.endpoint_state
        stored._scoring_uri = f"https://{endpoint.name}.eastus2.inference.ml.azure.com/score"
        self._c.endpoints[endpoint.name] = stored
        return FakePoller(self._c, f"endpoint:{endpoint.name}", copy.deepcopy(stored))

    def get_keys(self, name: str) -> Any:
        self._record("get_keys", name)
        if name not in self._c.endpoints:
            raise self._not_found(f"endpoint {name}")
        return SimpleNamespace(primary_key=self._c.primary_key, secondary_key="s" * 32)

    def begin_delete(self, name: str) -> FakePoller:
        self._record("begin_delete", name)
        self._c.endpoints.pop(name, None)
        return FakePoller(self._c, f"delete:{name}")


class DeploymentOps(_Ops):
    group = "online_deployments"

    def get(self, name: str, endpoint_name: str) -> Any:
        self._record("get", name=name, endpoint_name=endpoint_name)
        if (endpoint_name, name) not in self._c.deployments:
            raise self._not_found(f"deployment {endpoint_name}/{name}")
        return copy.deepcopy(self._c.deployments[(endpoint_name, name)])

    def begin_create_or_update(self, deployment: Any) -> FakePoller:
        self._record("begin_create_or_update", deployment)
        stored = copy.deepcopy(deployment)
        stored._provisioning_state = self._c.deployment_state
        self._c.deployments[(deployment.endpoint_name, deployment.name)] = stored
        return FakePoller(self._c, f"deployment:{deployment.name}", copy.deepcopy(stored))


class WorkspaceOps(_Ops):
    group = "workspaces"

    def get(self, name: str | None = None) -> Any:
        self._record("get", name)
        if self._c.workspace is None or self._c.workspace.name != name:
            raise self._not_found(f"workspace {name}")
        return self._c.workspace


@dataclass
class FakeMLClient:
    computes: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, Any] = field(default_factory=dict)
    deployments: dict[tuple[str, str], Any] = field(default_factory=dict)
    workspace: Any = None
    sizes: list = field(default_factory=list)
    usages: list = field(default_factory=list)
    deployment_state: str = "Succeeded"
    endpoint_state: str = "Succeeded"
    job_status: str = "Completed"
    primary_key: str = "k" * 44
    errors: dict[str, BaseException] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    submitted_jobs: dict[str, Any] = field(default_factory=dict)
    job_counter: int = 0

    def __post_init__(self) -> None:
        self.compute = ComputeOps(self)
        self.environments = EnvironmentOps(self)
        self.jobs = JobOps(self)
        self.models = ModelOps(self)
        self.online_endpoints = EndpointOps(self)
        self.online_deployments = DeploymentOps(self)
        self.workspaces = WorkspaceOps(self)

    def names(self) -> list[str]:
        """The recorded calls as "group.method", in order (poller results included)."""
        return [c.name for c in self.calls]

    def find(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


# --- settings the Azure tests share --------------------------------------------------------------

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
RESOURCE_GROUP = "rg-phi"
WORKSPACE = "ws-phi"
IDENTITY_NAME = "phi-endpoint-identity"
IDENTITY_CLIENT_ID = "99999999-8888-7777-6666-555555555555"
IDENTITY_RESOURCE_ID = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{IDENTITY_NAME}"
)
FILLED_IN = {
    "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION,
    "AZURE_RESOURCE_GROUP_NAME": RESOURCE_GROUP,
    "AZURE_ML_WORKSPACE_NAME": WORKSPACE,
    "AZURE_MANAGED_IDENTITY_CLIENT_ID": IDENTITY_CLIENT_ID,
    "AZURE_MANAGED_IDENTITY_NAME": IDENTITY_NAME,
    "AZURE_MANAGED_IDENTITY_RESOURCE_ID": IDENTITY_RESOURCE_ID,
}


def azure_settings(tmp_path: Path, *, filled_in: bool = True, data: bool = True, **overrides: object):
    """Settings for the azure backend, state and data under tmp_path, no .env read."""
    import config

    train, test = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "test.jsonl"
    if data:
        train.parent.mkdir(parents=True, exist_ok=True)
        row = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        train.write_text(row * 4)
        test.write_text(row)
    values: dict[str, object] = {
        "BACKEND": "azure",
        "STATE_DIR": str(tmp_path / "state"),
        "TRAIN_DATA_PATH": str(train),
        "TEST_DATA_PATH": str(test),
    }
    if filled_in:
        values.update(FILLED_IN)
    values.update(overrides)
    return config.load(env={}, dotenv_path=tmp_path / "no.env", **values)


class RefusingCredential:
    """Fails the way an Azure credential does without a login, at once and without any network."""

    def __init__(self) -> None:
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.exceptions import ClientAuthenticationError

        self.calls += 1
        raise ClientAuthenticationError(message="DefaultAzureCredential failed to retrieve a token (fake: no login)")


class AcceptingCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return SimpleNamespace(token="fake-token", expires_on=2**31)
