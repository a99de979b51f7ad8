"""A wire-level stand-in for Azure Resource Manager and the Azure ML data plane, on 127.0.0.1 over TLS.

The real `azure.ai.ml.MLClient` (1.35.2) talks to it over HTTPS: `MLClient(..., cloud=<unique name>,
cloud_metadata={"resource_manager": <this server>, ...})` points every ARM call here (see
`register_cloud`). It serves:

- ARM resources, stored by their ARM id: workspace, datastores, computes, environments (+versions),
  code assets (+versions, `startPendingUpload` and the SAS blob PUTs it leads to), models (+versions),
  jobs, online endpoints (+`listKeys`) and their deployments, the VM sizes/usages lists, a managed
  identity and its role assignments;
- long-running operations the way Azure runs them: 201/202 with `Azure-AsyncOperation` (or `Location`
  for deletes) pointing at `.../mfeOperationsStatus/<id>`, polled with an integer `Retry-After: 1`
  (`"0"` would make azure-core fall back to 30 s; a fraction fails to deserialize);
- the workspace discovery document and run history, so that `jobs.stream` streams a log and ends;
- a model registry (`azureml`): its discovery document and model versions with their lifecycle tags
  (`registry_models`), Phi-4-mini-instruct current and Phi-3-mini-4k-instruct retired as Azure has them;
- data assets, fine-tuning jobs with and without compute (serverless: fine-tuning as a service),
  which register their model in the workspace when they complete, and refuse a retired base model;
- serverless endpoints (+`listKeys`), whose inference URI is `serverless_uri` (default: Azure's host name);
- blob uploads: code snapshots go to the SAS URI `startPendingUpload` returns (here), data inputs
  go to `https://<account>.blob.<storage_endpoint>`, a host name: a CONNECT-only proxy (HTTPS_PROXY,
  with NO_PROXY for 127.0.0.1) sends it here, and the certificate names that host;
- injected failures (`fail(...)`) with Azure's error bodies, and operations that end `Failed`.

Response shapes are copied (trimmed, ids rewritten) from Azure's sanitized SDK recordings in
github.com/Azure/azure-sdk-assets, python/sdk/ml/azure-ai-ml/tests/recordings/... (cited next to each
shape as `recordings/...`). Where no recording was read, the comment names the REST model the shape
follows (azure-rest-api-specs, specification/machinelearningservices/..., as the SDK's generated
models spell it) and says "not checked against a recording".

Every request is recorded (`requests`): method, host, path, query, JSON body, headers without
Authorization.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import select
import socket
import socketserver
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import trustme

LOCATION = "eastus2"
STORAGE_ACCOUNT = "wsphistorage"
STORAGE_SUFFIX = "core.standin.test"  # the cloud's storage_endpoint: blobs live at <account>.blob.<suffix>
BLOB_HOST = f"{STORAGE_ACCOUNT}.blob.{STORAGE_SUFFIX}"
CONTAINER = "azureml-blobstore-00000000-0000-0000-0000-000000000000"
PRIMARY_KEY = "p" * 44
SERVERLESS_KEY = "k" * 32
ML = "/providers/Microsoft.MachineLearningServices"
_cloud_counter = itertools.count()


@dataclass
class Request:
    method: str
    host: str
    path: str  # unquoted, without the query
    query: dict[str, str]
    headers: dict[str, str]  # without Authorization
    raw: bytes = b""
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None

    def __repr__(self) -> str:  # what a failing assertion shows
        return f"{self.method} {self.host}{self.path}"


@dataclass
class Failure:
    """Answer the first `times` requests matching `method` ("*": any) and `path_re` with `status` and `body`."""

    method: str
    path_re: str
    status: int
    body: dict[str, Any]
    times: int = 1


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def azure_error(code: str, message: str) -> dict[str, Any]:
    # ARM's error envelope (recordings/.../test_online_deployment...json: "error": {"code", "message", ...}).
    return {"error": {"code": code, "message": message, "details": [], "additionalInfo": []}}


QUOTA_ERROR = azure_error(
    # The message Azure ML gives a compute or deployment PUT beyond the subscription's VM-family quota.
    "BadArgument",
    "Not enough quota available for Standard_NC24ads_A100_v4 in SubscriptionId 00000000-1111-2222-3333-"
    "444444444444. Current usage/limit: 0/0. Additional needed: 24 Please see troubleshooting guide, "
    "available here: https://aka.ms/oe-tsg#error-outofquota",
)
CONTAINER_CRASH = {
    "code": "ResourceNotReady",
    "message": "User container has crashed or terminated: Liveness probe failed. Please see troubleshooting "
               "guide, available here: https://aka.ms/oe-tsg#error-resourcenotready",
}  # fmt: skip
OUT_OF_QUOTA = {
    "code": "OutOfQuota",
    "message": "Not enough quota available for Standard_E8s_v3 in SubscriptionId 00000000-1111-2222-3333-"
               "444444444444. Current usage/limit: 96/100. Additional needed: 16 Please see troubleshooting guide, "
               "available here: https://aka.ms/oe-tsg#error-outofquota",
}  # fmt: skip
FORBIDDEN_ERROR = azure_error(
    "AuthorizationFailed",
    "The client 'user@example.com' with object id '00000000-0000-0000-0000-000000000000' does not have "
    "authorization to perform action 'Microsoft.MachineLearningServices/workspaces/onlineEndpoints/write' over "
    "scope '/subscriptions/...' or the scope is invalid.",
)


class FakeCredential:
    """A token credential that never touches the network (DefaultAzureCredential would probe 169.254.169.254)."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken("standin-token", 2**31)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        from azure.core.credentials import AccessTokenInfo

        self.scopes.append(scopes)
        return AccessTokenInfo("standin-token", 2**31)


class AzureStandin:
    def __init__(self, workdir: Path, subscription: str, resource_group: str, workspace: str) -> None:
        self.workdir = Path(workdir)
        self.sub, self.rg, self.ws = subscription, resource_group, workspace
        self.requests: list[Request] = []
        self.failures: list[Failure] = []
        self.resources: dict[str, dict[str, Any]] = {}  # lower-case ARM id -> resource JSON
        self.blobs: dict[str, bytes] = {}  # "<container>/<blob path>" -> content (any host)
        self.blob_meta: dict[str, dict[str, str]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        # knobs: how the next long-running operations and jobs end
        self.deployment_outcome = "Succeeded"
        self.endpoint_outcome = "Succeeded"
        self.job_outcome = "Completed"
        self.job_log = "step 1/1: loss 1.23\nmodel saved\n"
        # Polls that see InProgress before an operation ends: each costs the SDK one Retry-After (1 s).
        self.in_progress_polls = 0
        # GETs of a fine-tuning job that still see it Running (the SDK itself GETs it twice on submit).
        self.finetuning_running_gets = 3
        # The error a Failed operation carries (the codes and texts of Azure's online-endpoint
        # troubleshooting guide, https://aka.ms/oe-tsg).
        self.operation_error = CONTAINER_CRASH
        self.sizes = [
            # the REST VirtualMachineSize (vmSizes list), with the wire names the SDK's arm_ml_service models
            # map: vCPUs, memoryGB, osVhdSizeMB, ... (not checked against a recording)
            {"name": "Standard_NC24ads_A100_v4", "family": "standardNCADSA100v4Family", "vCPUs": 24, "gpus": 1,
             "osVhdSizeMB": 1047552, "maxResourceVolumeMB": 65536, "memoryGB": 220.0, "lowPriorityCapable": True,
             "premiumIO": True, "supportedComputeTypes": ["ComputeInstance", "AmlCompute"]},
            {"name": "Standard_E8s_v3", "family": "standardESv3Family", "vCPUs": 8, "gpus": 0,
             "osVhdSizeMB": 1047552, "maxResourceVolumeMB": 131072, "memoryGB": 64.0, "lowPriorityCapable": True,
             "premiumIO": True, "supportedComputeTypes": ["ComputeInstance", "AmlCompute"]},
        ]
        self.usages = {"standardNCADSA100v4Family": (0, 96), "standardESv3Family": (8, 100)}
        # The model catalog, (registry, name) -> versions oldest first. Phi-3-mini-4k-instruct's tags are
        # its spec's (Azure/azureml-assets assets/models/system/phi-3-mini-4k-instruct/spec.yaml, version 15);
        # Phi-4-mini-instruct's spec is not public: its deploy regions are the list Azure's fine-tuning
        # samples show, and how the registry writes a list-valued tag as a string is not checked against
        # a recording (the project reads a comma list, a JSON list and a Python list alike).
        self.registry_models: dict[tuple[str, str], list[dict[str, Any]]] = {
            ("azureml", "Phi-4-mini-instruct"): [_registry_model("azureml", "Phi-4-mini-instruct", "1", {
                "task": "chat-completion", "author": "Microsoft", "license": "MIT",
                "maas-finetuning-deploy-regions": "eastus2,eastus,northcentralus,westus3,westus,southcentralus",
            })],
            ("azureml", "Phi-3-mini-4k-instruct"): [_registry_model("azureml", "Phi-3-mini-4k-instruct", "15", {
                "InferenceLegacyDate": "2025-06-09", "InferenceDeprecationDate": "2025-06-30",
                "InferenceRetirementDate": "2025-08-30", "FinetuneDeprecationDate": "2025-06-30",
                "FinetuneRetirementDate": "2025-08-30", "maas-inference": "true", "task": "chat-completion",
                "author": "Microsoft", "license": "MIT",
            })],
        }  # fmt: skip
        # Where a serverless endpoint answers once created; None: Azure's host name for it.
        self.serverless_uri: str | None = None
        self.lock = threading.RLock()
        self._ops = itertools.count(1)
        self._ca = trustme.CA()
        self.ca_file = self.workdir / "standin-ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))
        self._server: ThreadingHTTPServer | None = None
        self._proxy: socketserver.ThreadingTCPServer | None = None
        self.proxied_hosts: list[str] = []
        self.runs: dict[str, dict[str, Any]] = {}  # job name -> run-history polls so far
        self.role_assignments: list[dict[str, Any]] = []  # of the managed identity
        self.identity = {
            # the REST Identity of Microsoft.ManagedIdentity 2023-01-31 (not checked against a recording)
            "id": f"/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/"
                  "Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "location": LOCATION,
            "properties": {"tenantId": "00000000-0000-0000-0000-000000000000",
                           "principalId": "pppppppp-0000-0000-0000-000000000000", "clientId": "{client_id}"},
        }

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> "AzureStandin":
        cert = self._ca.issue_cert("127.0.0.1", "localhost", BLOB_HOST)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, name="azure-standin", daemon=True).start()

        class Proxy(_ConnectProxy):
            owner = standin

        self._proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Proxy)
        self._proxy.daemon_threads = True
        threading.Thread(target=self._proxy.serve_forever, name="azure-standin-proxy", daemon=True).start()
        self._seed()
        return self

    def stop(self) -> None:
        for server in (self._server, self._proxy):
            if server is not None:
                server.shutdown()
                server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def proxy_url(self) -> str:
        assert self._proxy is not None
        return f"http://127.0.0.1:{self._proxy.server_address[1]}"

    def env(self) -> dict[str, str]:
        """What the process environment needs so that the SDK trusts this server and reaches the blob host."""
        return {
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
            "SSL_CERT_FILE": str(self.ca_file),
            "HTTPS_PROXY": self.proxy_url,
            "https_proxy": self.proxy_url,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def register_cloud(self) -> str:
        """Register a cloud pointing at this server with the SDK; its (process-unique) name.

        The SDK keeps clouds in a process-global table where the first registration of a name wins.
        """
        from azure.ai.ml import MLClient

        name = f"StandinCloud{next(_cloud_counter)}-{uuid.uuid4().hex[:6]}"
        MLClient(
            FakeCredential(), self.sub, self.rg, self.ws, cloud=name,
            cloud_metadata={
                "azure_portal": self.base_url + "/",
                "resource_manager": self.base_url + "/",
                "active_directory": self.base_url + "/",
                "aml_resource_id": self.base_url + "/",
                "storage_endpoint": STORAGE_SUFFIX,
                "registry_discovery_endpoint": self.base_url + "/",
            },
        )  # fmt: skip
        return name

    # --- test-facing helpers ----------------------------------------------------------------------------

    @property
    def ws_id(self) -> str:
        return f"/subscriptions/{self.sub}/resourceGroups/{self.rg}{ML}/workspaces/{self.ws}"

    def fail(self, method: str, path_re: str, status: int, body: dict[str, Any], times: int = 1) -> None:
        self.failures.append(Failure(method, path_re, status, body, times))

    def sent(self, method: str | None = None, path_re: str = "") -> list[Request]:
        """Recorded requests, in order, filtered by method and a regex searched in the path."""
        pattern = re.compile(path_re, re.IGNORECASE)
        return [r for r in self.requests if (method is None or r.method == method) and pattern.search(r.path)]

    def put_resource(self, arm_id: str, resource: dict[str, Any]) -> None:
        with self.lock:
            self.resources[arm_id.lower()] = copy.deepcopy(resource)

    def get_resource(self, arm_id: str) -> dict[str, Any] | None:
        return self.resources.get(arm_id.lower())

    def uploaded_files(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.blobs if k.startswith(prefix))

    # --- the resources a workspace has from the start ------------------------------------------------------

    def _seed(self) -> None:
        storage_id = f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Storage/storageAccounts/" \
                     f"{STORAGE_ACCOUNT}"  # fmt: skip
        # recordings/online_services/e2etests/test_online_deployment.pyTestOnlineDeploymenttest_online_deployment_create.json
        # (the first entry: GET workspace; trimmed)
        self.put_resource(self.ws_id, {
            "id": self.ws_id, "name": self.ws, "type": "Microsoft.MachineLearningServices/workspaces",
            "location": LOCATION, "tags": {}, "etag": None, "kind": "Default",
            "properties": {
                "friendlyName": self.ws, "description": "", "storageAccount": storage_id,
                "keyVault": f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Keyvault/vaults/kvphi",
                "applicationInsights": f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/"
                                       "Microsoft.insights/components/aiphi",
                "containerRegistry": f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/"
                                     "Microsoft.ContainerRegistry/registries/crphi",
                "hbiWorkspace": False, "tenantId": "00000000-0000-0000-0000-000000000000",
                "provisioningState": "Succeeded", "v1LegacyMode": False, "storageHnsEnabled": False,
                "workspaceId": "5881e5dc-6e3e-408e-b99e-754026b4a07b", "publicNetworkAccess": "Enabled",
                "discoveryUrl": f"{self.base_url}/discovery",
                "mlFlowTrackingUri": f"azureml://127.0.0.1:{self.port}/mlflow/v1.0{self.ws_id}",
                "systemDatastoresAuthMode": "accesskey", "enableDataIsolation": False,
                "managedNetwork": {"isolationMode": "Disabled"},
            },
            "identity": {"type": "SystemAssigned", "principalId": "00000000-0000-0000-0000-000000000000",
                         "tenantId": "00000000-0000-0000-0000-000000000000"},
            "sku": {"name": "Basic", "tier": "Basic"},
        })  # fmt: skip
        ds_id = f"{self.ws_id}/datastores/workspaceblobstore"
        # recordings/finetuning_job/e2e_tests/test_maap_finetuning_job.pyTestCustomModelFineTuningJob_MaaP
        # test_using_aml_compute.json (its first entry: GET datastores/workspaceblobstore; trimmed)
        self.put_resource(ds_id, {
            "id": ds_id, "name": "workspaceblobstore", "type": "Microsoft.MachineLearningServices/workspaces/datastores",
            "properties": {
                "description": None, "tags": {}, "properties": {}, "isDefault": True,
                "credentials": {"credentialsType": "AccountKey"}, "datastoreType": "AzureBlob",
                "accountName": STORAGE_ACCOUNT, "containerName": CONTAINER, "endpoint": STORAGE_SUFFIX,
                "protocol": "https", "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity",
            },
            "systemData": _system_data(),
        })  # fmt: skip

    # --- dispatch ---------------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        with self.lock:
            self.requests.append(req)
            for failure in self.failures:
                if (failure.times > 0 and failure.method in ("*", req.method)
                        and re.search(failure.path_re, req.path, re.I)):  # fmt: skip
                    failure.times -= 1
                    return Response(failure.status, failure.body, {"x-ms-failure-cause": "service"})
            if req.host.split(":")[0].lower() == BLOB_HOST or req.path.startswith(f"/{CONTAINER}/"):
                return self._blob(req)
            for pattern, handler in self._routes():
                match = re.fullmatch(pattern, req.path, re.IGNORECASE)
                if match:
                    return handler(req, *match.groups())
            return Response(404, azure_error("NoRouteFound", f"standin: no route for {req.method} {req.path}"))

    def _routes(self) -> list[tuple[str, Callable[..., Response]]]:
        ws = re.escape(self.ws_id)
        sub = f"/subscriptions/{re.escape(self.sub)}"
        return [
            (r"/discovery", self._discovery),
            (r"/registrymanagement/v1\.0/registries/([^/]+)/discovery", self._registry_discovery),
            (r"/mferp/managementfrontend/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
             r"Microsoft\.MachineLearningServices/registries/([^/]+)/models/([^/]+)/versions(?:/([^/]+))?",
             self._registry_model_versions),
            (f"{sub}{ML}/locations/([^/]+)/(?:mfe|compute)Operations(Status|Results)/([^/]+)", self._operation),
            (f"{sub}{ML}/locations/([^/]+)/(vmSizes|usages)", self._sizes_or_usages),
            (f"{sub}/resourceGroups/[^/]+/providers/Microsoft\\.ManagedIdentity/userAssignedIdentities/([^/]+)",
             self._identity),
            (f"{sub}/providers/Microsoft\\.Authorization/roleAssignments", self._role_assignments),
            (f"/history/v1\\.0{ws}/(?:experimentids/[^/]+/|experiments/[^/]+/)?runs/([^/]+)/details",
             self._run_details),
            (r"/logs/([^/]+)/(.+)", self._log),
            (f"{ws}/codes/([^/]+)/versions/([^/]+)/startPendingUpload", self._start_pending_upload),
            (f"{ws}/datastores/([^/]+)/listSecrets", self._datastore_secrets),
            (f"{ws}/onlineEndpoints/([^/]+)/listKeys", self._list_keys),
            (f"{ws}/serverlessEndpoints/([^/]+)/listKeys", self._list_serverless_keys),
            (f"({ws}(?:/[^/]+/[^/]+)*)", self._arm),
            (f"({ws}(?:/[^/]+/[^/]+)*/[^/]+)", self._arm_list),
        ]

    # --- generic ARM resources ----------------------------------------------------------------------------

    def _arm(self, req: Request, arm_id: str) -> Response:
        kind = _kind(arm_id)
        stored = self.get_resource(arm_id)
        if req.method == "GET":
            if stored is not None and kind == "jobs" and stored["properties"].get("jobType") == "FineTuning":
                self._advance_finetuning(stored)
            if stored is None:
                return Response(404, azure_error(
                    "UserError" if kind != "computes" else "ResourceNotFound",
                    f"Could not find {kind} {arm_id.rsplit('/', 1)[-1]} (standin)",
                ))  # fmt: skip
            return Response(200, stored)
        if req.method == "PUT":
            return self._put(req, arm_id, kind, stored)
        if req.method == "DELETE":
            if stored is None:
                return Response(204)
            return self._delete(arm_id)
        return Response(405, azure_error("MethodNotAllowed", req.method))

    def _advance_finetuning(self, job: dict[str, Any]) -> None:
        """A fine-tuning job has no run-history stream: its status moves with each GET of the job."""
        run = self.runs.setdefault(job["name"], {"polls": 0})
        run["polls"] += 1
        job["properties"]["status"] = "Running" if run["polls"] <= self.finetuning_running_gets else self.job_outcome
        if job["properties"]["status"] == "Completed" and not run.get("registered"):
            run["registered"] = True
            self._register_fine_tuned_model(job)

    def _register_fine_tuned_model(self, job: dict[str, Any]) -> None:
        """What Azure does when a fine-tuning job completes: a new version of the output's model in the
        workspace, made by the job (the REST ModelVersion; not checked against a recording)."""
        output = (job["properties"].get("outputs") or {}).get("registered_model") or {}
        name = output.get("assetName") or job["name"]
        container = self.get_resource(f"{self.ws_id}/models/{name}")
        version = (container or {}).get("properties", {}).get("nextVersion") or "1"
        arm_id = f"{self.ws_id}/models/{name}/versions/{version}"
        resource = {"id": arm_id, "name": version, "type": _arm_type(arm_id), "systemData": _system_data(),
                    "properties": {"description": None, "tags": {}, "properties": {}, "modelType": "mlflow_model",
                                   "modelUri": f"azureml://jobs/{job['name']}/outputs/registered_model",
                                   "jobName": job["name"], "provisioningState": "Succeeded"}}  # fmt: skip
        self._fill_versions(resource, None, arm_id)
        self.put_resource(arm_id, resource)

    def _retired_base_model(self, props: dict[str, Any]) -> Response | None:
        """Azure refuses a fine-tuning job of a model retired for fine-tuning (the error's code and text are
        not checked against a recording: the project's own check stops such a job before it is sent)."""
        uri = str(((props.get("fineTuningDetails") or {}).get("model") or {}).get("uri") or "")
        match = re.match(r"azureml://registries/([^/]+)/models/([^/]+)/", uri)
        versions = self.registry_models.get((match.group(1), match.group(2))) if match else None
        if not versions:
            return None
        retired = versions[-1]["properties"]["tags"].get("FinetuneRetirementDate")
        if retired and retired <= time.strftime("%Y-%m-%d"):
            return Response(400, azure_error(
                "UserError", f"Model {match.group(2)} was retired for fine-tuning on {retired} and cannot be fine-tuned.",
            ))  # fmt: skip
        return None

    def _arm_list(self, req: Request, collection: str) -> Response:
        if req.method != "GET":
            return Response(404, azure_error("NoRouteFound", f"standin: no route for {req.method} {req.path}"))
        prefix = collection.lower() + "/"
        items = [r for k, r in self.resources.items() if k.startswith(prefix) and "/" not in k[len(prefix):]]
        if "hash" in req.query and "/codes/" in collection.lower():
            # recordings/code_asset/e2etests/test_code.pyTestCodetest_create_and_get.json: GET codes/<new name>/
            # versions?hash=<h> answers with the version of ANY code asset whose content has that hash
            items = [r for k, r in self.resources.items() if "/codes/" in k and "/versions/" in k
                     and r["properties"].get("properties", {}).get("hash_sha256") == req.query["hash"]]  # fmt: skip
        if collection.lower().endswith("/datastores") and req.query.get("isDefault") == "true":
            items = [r for r in items if r["properties"].get("isDefault")]
        return Response(200, {"value": items})

    def _put(self, req: Request, arm_id: str, kind: str, stored: dict[str, Any] | None) -> Response:
        body = req.json or {}
        name = arm_id.rsplit("/", 1)[-1]
        resource = {
            "id": arm_id, "name": name, "type": _arm_type(arm_id),
            **{k: v for k, v in body.items() if k not in ("id", "name", "type")},
            "systemData": _system_data(),
        }  # fmt: skip
        resource.setdefault("properties", {})
        filler = getattr(self, f"_fill_{kind}", None)
        if filler is not None:
            filler(resource, stored, arm_id)
        if kind == "jobs" and (body.get("properties") or {}).get("jobType") == "FineTuning":
            refusal = self._retired_base_model(body["properties"])
            if refusal is not None:
                return refusal
        long_running = kind in ("computes", "onlineEndpoints", "deployments", "serverlessEndpoints")
        if not long_running:
            resource["properties"].setdefault("provisioningState", "Succeeded")
            self.put_resource(arm_id, resource)
            return Response(200 if stored else 201, resource)
        outcome = {"deployments": self.deployment_outcome, "onlineEndpoints": self.endpoint_outcome}.get(kind, "Succeeded")
        resource["properties"]["provisioningState"] = "Updating" if stored else "Creating"
        self.put_resource(arm_id, resource)
        op = self._new_operation(arm_id, outcome, final_resource_state=outcome, compute=kind == "computes")
        op["working"] = "Updating" if stored else "Creating"
        # recordings/online_services/e2etests/test_online_deployment.pyTestOnlineDeploymenttest_online_deployment_create.json:
        # PUT onlineEndpoints -> 201, Azure-AsyncOperation .../mfeOperationsStatus/<id>, Location <the resource>
        return Response(200 if stored else 201, resource, {
            "Azure-AsyncOperation": op["status_url"],
            "Location": f"{self.base_url}{arm_id}",
            "Retry-After": "1",
            "x-ms-async-operation-timeout": "PT30M",
        })  # fmt: skip

    def _delete(self, arm_id: str) -> Response:
        op = self._new_operation(arm_id, "Succeeded", delete=True)
        # ARM's asynchronous delete: 202 with Location .../mfeOperationResults/<id> and Azure-AsyncOperation
        # (not checked against a recording)
        return Response(202, None, {
            "Azure-AsyncOperation": op["status_url"], "Location": op["result_url"], "Retry-After": "1",
        })  # fmt: skip

    def _new_operation(self, arm_id: str, outcome: str, *, delete: bool = False,
                       final_resource_state: str = "Succeeded", compute: bool = False) -> dict[str, Any]:  # fmt: skip
        op_id = f"oeidp:{uuid.uuid4()}:{next(self._ops)}"
        base = f"{self.base_url}/subscriptions/{self.sub}{ML}/locations/{LOCATION}"
        # recordings/compute/e2etests/test_compute.pyTestComputetest_aml_compute_create_and_delete.json: computes
        # are polled at .../computeOperationsStatus/<id>; endpoints and deployments at .../mfeOperationsStatus/<id>
        status_kind = "computeOperationsStatus" if compute else "mfeOperationsStatus"
        op = {
            "id": op_id, "arm_id": arm_id, "outcome": outcome, "polls": 0, "delete": delete,
            "final_state": final_resource_state, "finished_at": None, "compute": compute, "working": "Deleting",
            "status_url": f"{base}/{status_kind}/{op_id}?api-version=2024-10-01",
            "result_url": f"{base}/mfeOperationResults/{op_id}?api-version=2024-10-01",
        }
        self.operations[op_id] = op
        return op

    def _operation(self, req: Request, location: str, which: str, op_id: str) -> Response:
        op = self.operations.get(unquote(op_id))
        if op is None:
            return Response(404, azure_error("NotFound", f"operation {op_id}"))
        op["polls"] += 1
        if op["polls"] <= self.in_progress_polls and which == "Status":  # as Azure answers while it works
            if op["compute"]:  # recordings/compute/...test_aml_compute_create_and_delete.json
                return Response(200, {"status": "InProgress"}, {"Retry-After": "1"})
            # recordings/online_services/.../test_online_deployment_create.json: a deployment's operation reads
            # "Updating" (not "InProgress") with a zero endTime while it runs
            return Response(200, {"id": op["status_url"], "name": op["id"], "status": op["working"],
                                  "startTime": "2025-02-27T10:37:16.6388327+00:00",
                                  "endTime": "0001-01-01T00:00:00+00:00", "percentComplete": 0.0},
                            {"Retry-After": "1"})  # fmt: skip
        self._finish(op)
        if which == "Results":
            return Response(200 if not op["delete"] else 204, None)
        # recordings/online_services/.../test_online_deployment_create.json: GET mfeOperationsStatus ->
        # {"id", "name", "status", "startTime", "endTime", "percentComplete"}; a failed one carries "error";
        # recordings/compute/...: {"status": "Succeeded", "percentComplete": 100.0}
        body: dict[str, Any] = {"id": op["status_url"], "name": op["id"], "status": op["outcome"],
                                "startTime": "2025-02-27T10:37:16.6388327+00:00",
                                "endTime": "2025-02-27T10:39:16.6388327+00:00", "percentComplete": 100.0}
        if op["outcome"] != "Succeeded":
            body["error"] = copy.deepcopy(self.operation_error)
        return Response(200, body)

    def _finish(self, op: dict[str, Any]) -> None:
        if op["finished_at"] is not None:
            return
        op["finished_at"] = len(self.requests) - 1  # the index of the poll that saw it end
        if op["delete"]:
            prefix = op["arm_id"].lower()
            for key in [k for k in self.resources if k == prefix or k.startswith(prefix + "/")]:
                del self.resources[key]
            return
        stored = self.get_resource(op["arm_id"])
        if stored is not None:
            stored["properties"]["provisioningState"] = op["final_state"]
            if _kind(op["arm_id"]) == "serverlessEndpoints" and op["final_state"] == "Succeeded":
                name = stored["name"]
                stored["properties"]["endpointState"] = "Online"
                stored["properties"]["inferenceEndpoint"] = {
                    "uri": self.serverless_uri or f"https://{name}.{LOCATION}.models.ai.azure.com", "headers": {}}
            if _kind(op["arm_id"]) == "onlineEndpoints" and op["final_state"] == "Succeeded":
                name = stored["name"]
                stored["properties"]["scoringUri"] = f"https://{name}.{LOCATION}.inference.ml.azure.com/score"
                stored["properties"]["swaggerUri"] = f"https://{name}.{LOCATION}.inference.ml.azure.com/swagger.json"

    # --- what the service fills in on each kind --------------------------------------------------------------

    def _fill_computes(self, res: dict[str, Any], stored: Any, arm_id: str) -> None:
        # recordings/compute/e2etests/test_compute.pyTestComputetest_aml_compute_create_and_delete.json (PUT
        # response: createdOn, computeType, isAttachedCompute, properties.vmSize upper-cased by the service,
        # scaleSettings, osType, ...; trimmed)
        res.setdefault("location", LOCATION)
        res.setdefault("tags", None)
        props = res["properties"]
        props.setdefault("computeLocation", LOCATION)
        props.setdefault("isAttachedCompute", False)
        props.setdefault("disableLocalAuth", True)
        props.update({"createdOn": "2024-12-18T09:04:09.3520974+00:00", "modifiedOn": "2024-12-18T09:04:09.3520974+00:00",
                      "provisioningErrors": None, "resourceId": None})  # fmt: skip
        inner = props.setdefault("properties", {})
        if inner.get("vmSize"):
            inner["vmSize"] = inner["vmSize"].upper()
        inner.setdefault("osType", "Linux")
        inner.setdefault("scaleSettings", {"maxNodeCount": 1, "minNodeCount": 0, "nodeIdleTimeBeforeScaleDown": "PT2M"})
        inner.update({"allocationState": "Steady", "currentNodeCount": 0, "targetNodeCount": 0,
                      "nodeStateCounts": {"idleNodeCount": 0, "runningNodeCount": 0, "preparingNodeCount": 0,
                                          "unusableNodeCount": 0, "leavingNodeCount": 0, "preemptedNodeCount": 0}})

    def _fill_versions(self, res: dict[str, Any], stored: Any, arm_id: str) -> None:
        kind = arm_id.split("/")[-4]
        props = res["properties"]
        props.setdefault("isArchived", False)
        props.setdefault("isAnonymous", False)
        if kind == "models":
            # the REST ModelVersion ("flavors", "modelType", "modelUri", "jobName"): the SDK dereferences
            # "flavors" (a null one crashes Model._from_rest_object), which the service fills in from the
            # MLmodel file (not checked against a recording)
            props.setdefault("flavors", {"python_function": {"data": {"loader_module": "mlflow.transformers"}}})
            props.setdefault("jobName", None)
        if kind == "data":
            # recordings/dataset/e2etests/test_data.pyTestDatatest_create_uri_file.json (PUT data/<name>/versions/<v>
            # -> 201): the service writes dataUri in its long form, under the workspace's own path
            uri = str(props.get("dataUri") or "")
            if uri.startswith("azureml://datastores/"):
                props["dataUri"] = (f"azureml://subscriptions/{self.sub}/resourcegroups/{self.rg}/workspaces/{self.ws}/"
                                    + uri.removeprefix("azureml://"))  # fmt: skip
            props.setdefault("autoDeleteSetting", None)
            props.setdefault("stage", None)
            props.setdefault("intellectualProperty", None)
        if kind == "environments":
            # the REST EnvironmentVersion: "environmentType": "UserCreated", "osType": "Linux", "autoRebuild"
            # (not checked against a recording)
            props.setdefault("environmentType", "UserCreated")
            props.setdefault("osType", "Linux")
            props.setdefault("autoRebuild", "OnBaseImageUpdate")
        # a container appears with its first version, and knows its latest version
        container_id = arm_id.rsplit("/versions/", 1)[0]
        container = self.get_resource(container_id) or {
            "id": container_id, "name": container_id.rsplit("/", 1)[-1], "type": _arm_type(container_id),
            "properties": {"isArchived": False, "description": None, "tags": {}, "properties": {}},
            "systemData": _system_data(),
        }  # fmt: skip
        container["properties"]["latestVersion"] = arm_id.rsplit("/", 1)[-1]
        container["properties"]["nextVersion"] = str(int(arm_id.rsplit("/", 1)[-1]) + 1) \
            if arm_id.rsplit("/", 1)[-1].isdigit() else "1"  # fmt: skip
        self.put_resource(container_id, container)

    def _fill_jobs(self, res: dict[str, Any], stored: Any, arm_id: str) -> None:
        # A command job's PUT response as the SDK reads it: status, services.Studio/Tracking, each output's uri
        # (the REST CommandJob; not checked against a recording). A fine-tuning job's is from its recording.
        props = res["properties"]
        name = res["name"]
        props["status"] = "Starting"
        props.setdefault("experimentName", "Default")
        props.setdefault("properties", {})
        self.runs[name] = {"polls": 0}
        if props.get("jobType") == "FineTuning":
            # recordings/finetuning_job/e2e_tests/test_maap_finetuning_job.pyTestCustomModelFineTuningJob_MaaP
            # test_using_aml_compute.json (PUT jobs response, trimmed): status "Running", "services": null,
            # computeId as sent, taskType echoed in PascalCase, outputs with mode and a null uri
            props["status"] = "Running"
            props["services"] = None
            details = props.get("fineTuningDetails") or {}
            task = details.get("taskType") or ""
            details["taskType"] = task[:1].upper() + task[1:]
            # MaaP: on the workspace's compute; MaaS: fine-tuning as a service, no computeId
            props["properties"].update({"PipelineType": "FineTuning", "azureml.PipelineType": "FineTuning",
                                        "_fineTuningJobType": "MaaP" if props.get("computeId") else "MaaS",
                                        "StartTimeUtc": "2024-11-25 07:35:39"})  # fmt: skip
            for out in (props.get("outputs") or {}).values():
                out.update({"description": None, "uri": None, "mode": "ReadWriteMount"})
            return
        props["services"] = {
            "Tracking": {"jobServiceType": "Tracking", "endpoint": f"azureml://{LOCATION}.api.azureml.ms/mlflow/v1.0"
                         f"{self.ws_id}?"},  # fmt: skip
            "Studio": {"jobServiceType": "Studio", "endpoint": f"https://ml.azure.com/runs/{name}?wsid={self.ws_id}"},
        }
        outputs = props.setdefault("outputs", {}) or {}
        props["outputs"] = outputs
        for out_name, out in outputs.items():
            if isinstance(out, dict) and out.get("uri") is None and props.get("jobType") == "Command":
                out["uri"] = f"azureml://datastores/workspaceartifactstore/ExperimentRun/dcid.{name}/{out_name}"

    def _fill_onlineEndpoints(self, res: dict[str, Any], stored: Any, arm_id: str) -> None:  # noqa: N802
        # recordings/online_services/.../test_online_deployment_create.json (PUT onlineEndpoints response; trimmed)
        res.setdefault("location", LOCATION)
        res["kind"] = "Managed"
        props = res["properties"]
        props.setdefault("properties", {})
        props["properties"]["azureml.onlineendpointid"] = arm_id.lower()
        props.setdefault("scoringUri", (stored or {}).get("properties", {}).get("scoringUri"))
        props.setdefault("swaggerUri", (stored or {}).get("properties", {}).get("swaggerUri"))
        props.setdefault("traffic", {})
        props.setdefault("mirrorTraffic", {})
        props.setdefault("publicNetworkAccess", "Enabled")
        identity = res.get("identity") or {"type": "SystemAssigned"}
        if identity.get("type", "").lower() == "userassigned":
            for uai in (identity.get("userAssignedIdentities") or {}).values():
                if isinstance(uai, dict):
                    uai.setdefault("principalId", "pppppppp-0000-0000-0000-000000000000")
        res["identity"] = identity

    def _fill_serverlessEndpoints(self, res: dict[str, Any], stored: Any, arm_id: str) -> None:  # noqa: N802
        # azure-rest-api-specs machinelearningservices stable/2025-12-01 examples/Workspace/ServerlessEndpoint/
        # createOrUpdate.json and get.json (the 201/200 bodies): properties.modelSettings, authMode,
        # inferenceEndpoint {uri, headers}, provisioningState, endpointState, contentSafety; sku Consumption
        res.setdefault("location", LOCATION)
        res["kind"] = "ServerlessEndpoint"
        props = res["properties"]
        props.setdefault("authMode", "Key")
        props.setdefault("contentSafety", {"contentSafetyStatus": "Enabled"})
        props["endpointState"] = "Creating"
        props["inferenceEndpoint"] = (stored or {}).get("properties", {}).get("inferenceEndpoint") or {"uri": None,
                                                                                                       "headers": {}}

    def _fill_deployments(self, res: dict[str, Any], stored: Any, arm_id: str) -> None:
        # The REST ManagedOnlineDeployment as the service returns it: "sku", properties.scaleSettings,
        # endpointComputeType. The SDK dereferences scaleSettings and sku when it reads a deployment back (a
        # missing one is an AttributeError); the rest echoes the request (not checked against a recording).
        res.setdefault("location", LOCATION)
        res["kind"] = "Managed"
        props = res["properties"]
        props.setdefault("scaleSettings", {"scaleType": "Default"})
        props.setdefault("endpointComputeType", "Managed")
        props.setdefault("egressPublicNetworkAccess", "Enabled")
        props.setdefault("appInsightsEnabled", False)
        props.setdefault("properties", {"AzureAsyncOperationUri": ""})
        res.setdefault("sku", {"name": "Default", "tier": "Standard", "capacity": (res.get("sku") or {}).get("capacity", 1)})

    # --- actions and data plane ----------------------------------------------------------------------------

    def _discovery(self, req: Request) -> Response:
        # the shape of https://<region>.api.azureml.ms/discovery: service name -> base URL
        base = self.base_url
        return Response(200, {"api": base, "catalog": base, "experimentation": base, "gallery": base,
                              "history": base, "hyperdrive": base, "labeling": base, "modelmanagement": base,
                              "pipelines": base, "studio": "https://ml.azure.com"})  # fmt: skip

    def _identity(self, req: Request, name: str) -> Response:
        body = json.loads(json.dumps(self.identity).replace("{name}", name))
        return Response(200, body)

    def _role_assignments(self, req: Request) -> Response:
        return Response(200, {"value": self.role_assignments})

    def _sizes_or_usages(self, req: Request, location: str, which: str) -> Response:
        if which == "vmSizes":
            return Response(200, {"value": self.sizes})
        # the REST Usage list (name {value, localizedValue}, currentValue, limit; not checked against a recording)
        return Response(200, {"value": [
            {"id": f"/subscriptions/{self.sub}{ML}/locations/{location}/usages/{family}", "type":
             "Microsoft.MachineLearningServices/totalCores", "unit": "Count", "currentValue": used, "limit": limit,
             "name": {"value": family, "localizedValue": family}}
            for family, (used, limit) in self.usages.items()
        ]})  # fmt: skip

    def _start_pending_upload(self, req: Request, name: str, version: str) -> Response:
        # The REST PendingUploadResponseDto: blobReferenceForConsumption {blobUri, storageAccountArmId,
        # credential {credentialType: "SAS", sasUri}}, pendingUploadId, pendingUploadType (not checked against
        # a recording). The SAS URI points here: the SDK uploads wherever it says.
        blob_uri = f"{self.base_url}/{CONTAINER}/LocalUpload/{name}"
        return Response(200, {
            "blobReferenceForConsumption": {
                "blobUri": blob_uri,
                "storageAccountArmId": f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/"
                                       f"Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}",
                "credential": {"credentialType": "SAS", "sasUri": f"{blob_uri}?sv=2019-02-02&sr=c&sig=standin"},
            },
            "pendingUploadId": str(uuid.uuid4()), "pendingUploadType": "TemporaryBlobReference",
        })  # fmt: skip

    def _datastore_secrets(self, req: Request, name: str) -> Response:
        # recordings/finetuning_job/...test_using_aml_compute.json: POST listSecrets {"expirableSecret": true,
        # "expireAfterHours": 1} -> {"secretsType": "Sas", "sasToken"}; an account-key datastore answers
        # {"secretsType": "AccountKey", "key"} (Az PowerShell's recorded debug output)
        return Response(200, {"secretsType": "AccountKey", "key": "a2V5" * 22})

    def _list_keys(self, req: Request, name: str) -> Response:
        if self.get_resource(f"{self.ws_id}/onlineEndpoints/{name}") is None:
            return Response(404, azure_error("UserError", f"endpoint {name} not found"))
        # the REST EndpointAuthKeys: POST listKeys -> {"primaryKey", "secondaryKey"} (not checked against a recording)
        return Response(200, {"primaryKey": PRIMARY_KEY, "secondaryKey": "s" * 44})

    def _list_serverless_keys(self, req: Request, name: str) -> Response:
        if self.get_resource(f"{self.ws_id}/serverlessEndpoints/{name}") is None:
            return Response(404, azure_error("UserError", f"serverless endpoint {name} not found"))
        # examples/Workspace/ServerlessEndpoint/listKeys.json: {"primaryKey", "secondaryKey"}
        return Response(200, {"primaryKey": SERVERLESS_KEY, "secondaryKey": "t" * 32})

    def _registry_discovery(self, req: Request, registry: str) -> Response:
        # recordings/model/e2etests/test_model.pyTestModeltest_create_get_download_model_registry.json
        # (GET .../registrymanagement/v1.0/registries/<r>/discovery; the registry's own subscription and group)
        if not any(r == registry for r, _ in self.registry_models):
            return Response(404, azure_error("NotFound", f"registry {registry} not found"))
        return Response(200, {
            "registryId": "3b513a6b-f110-4e7f-9ce3-472b5aa28170", "registryName": registry,
            "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47", "primaryRegion": LOCATION, "regions": [LOCATION],
            "subscriptionId": "00000000-aaaa-bbbb-cccc-000000000000", "resourceGroup": "registry-builtin-prod-eastus-01",
            "workspaceName": None, "primaryRegionResourceProviderUri": self.base_url + "/",
            "registryFqdns": {LOCATION: {"uri": self.base_url}}, "intellectualPropertyPublisher": None,
        })  # fmt: skip

    def _registry_model_versions(self, req: Request, registry: str, name: str, version: str | None) -> Response:
        # The registry data plane (api-version 2021-10-01-dataplanepreview), as the SDK's models.get(name,
        # label="latest") calls it: the versions list with $orderBy=createdtime desc&$top=1, then the version
        # (recordings/dataset/e2etests/test_data.pyTestDatatest_data_get_latest_label_in_registry.json shows
        # the same calls and envelope for a data asset)
        versions = self.registry_models.get((registry, name))
        if versions is None:
            if version is None:
                return Response(200, {"value": []})
            return Response(404, azure_error("UserError", f"Model container with name: {name} not found."))
        if version is None:
            listed = list(reversed(versions))[: int(req.query.get("$top", len(versions)))]
            return Response(200, {"value": listed})
        for item in versions:
            if item["name"] == version:
                return Response(200, item)
        return Response(404, azure_error("UserError", f"Model {name}:{version} not found."))

    def _run_details(self, req: Request, run_id: str) -> Response:
        run = self.runs.get(run_id)
        job = self.get_resource(f"{self.ws_id}/jobs/{run_id}")
        if run is None or job is None:
            return Response(404, azure_error("UserError", f"run {run_id} not found"))
        run["polls"] += 1
        status = "Running" if run["polls"] == 1 else self.job_outcome
        job["properties"]["status"] = status
        # the run-history RunDetails shape (azure/ai/ml/_restclient/runhistory/models: runId, status,
        # logFiles name -> URL, error): one poll Running, then the outcome, with the log
        body: dict[str, Any] = {"runId": run_id, "target": job["properties"].get("computeId"), "status": status,
                                "startTimeUtc": "2025-02-27T10:35:41.000Z", "properties": {}, "inputDatasets": [],
                                "outputDatasets": [], "warnings": [], "logFiles": {}}  # fmt: skip
        if run["polls"] > 1:
            body["logFiles"] = {"user_logs/std_log.txt": f"{self.base_url}/logs/{run_id}/user_logs/std_log.txt"}
            body["endTimeUtc"] = "2025-02-27T10:45:41.000Z"
        if status == "Failed":
            body["error"] = {"error": {"code": "UserError", "message": "CUDA out of memory (standin)"}}
        return Response(200, body)

    def _log(self, req: Request, run_id: str, path: str) -> Response:
        return Response(200, self.job_log.encode(), {"Content-Type": "text/plain"})

    def _blob(self, req: Request) -> Response:
        # The Blob service REST API (learn.microsoft.com/rest/api/storageservices): Put Blob -> 201,
        # Set Blob Metadata (comp=metadata) -> 200, Get Blob Properties (HEAD) -> 200 with x-ms-meta-*.
        key = req.path.lstrip("/")
        done = {"ETag": '"0x8D0"', "Last-Modified": "Thu, 27 Feb 2025 10:35:41 GMT",
                "x-ms-request-server-encrypted": "true"}  # fmt: skip
        meta = {k: v for k, v in req.headers.items() if k.lower().startswith("x-ms-meta-")}
        if req.method == "PUT":
            comp = req.query.get("comp")
            if comp == "metadata":
                self.blob_meta[key] = meta
                return Response(200, None, done)
            if comp in ("block", "blocklist"):
                return Response(201, None, done)
            self.blobs[key] = req.raw
            self.blob_meta[key] = meta
            return Response(201, None, done)
        if req.method in ("GET", "HEAD"):
            if req.query.get("comp") == "list" or req.query.get("restype") == "container":
                return Response(200, _blob_list(self.blobs, key, req.query.get("prefix", "")),
                                {"Content-Type": "application/xml"})  # fmt: skip
            if key in self.blobs:
                return Response(200, self.blobs[key] if req.method == "GET" else b"", {
                    "Content-Type": "application/octet-stream", "x-ms-blob-type": "BlockBlob",
                    "Content-Length": str(len(self.blobs[key])), **done, **self.blob_meta.get(key, {})})  # fmt: skip
            return Response(404, b"", {"x-ms-error-code": "BlobNotFound"})
        return Response(202, None)


# --- small helpers ---------------------------------------------------------------------------------------


def _kind(arm_id: str) -> str:
    """The collection a workspace child belongs to (the last even segment): computes, jobs, versions, ..."""
    parts = arm_id.strip("/").split("/")
    return parts[-2] if len(parts) % 2 == 0 else parts[-1]


def _arm_type(arm_id: str) -> str:
    parts = arm_id.strip("/").split("/")
    i = [p.lower() for p in parts].index("workspaces")
    return "Microsoft.MachineLearningServices/" + "/".join(parts[i::2])


def _registry_model(registry: str, name: str, version: str, tags: dict[str, str]) -> dict[str, Any]:
    # A registry model version: the envelope of the recorded registry data GET (id an azureml:// URI, name the
    # version) with the REST ModelVersion's properties; "flavors" must be a dict (the SDK iterates it)
    return {
        "id": f"azureml://registries/{registry}/models/{name}/versions/{version}", "name": version, "type": "models",
        "properties": {"description": None, "tags": dict(tags), "properties": {}, "flavors": {},
                       "modelType": "mlflow_model", "isArchived": False, "isAnonymous": False,
                       "modelUri": f"azureml://registries/{registry}/models/{name}/versions/{version}"},
        "systemData": _system_data(),
    }  # fmt: skip


def _system_data() -> dict[str, str]:
    return {"createdAt": "2025-02-27T10:35:40.9422688+00:00", "createdBy": "Sanitized", "createdByType": "User",
            "lastModifiedAt": "2025-02-27T10:35:40.9422688+00:00", "lastModifiedBy": "Sanitized",
            "lastModifiedByType": "User"}  # fmt: skip


def _blob_list(blobs: dict[str, bytes], container_path: str, prefix: str) -> bytes:
    container = container_path.split("/", 1)[0]
    names = [k.split("/", 1)[1] for k in blobs if k.startswith(container + "/") and k.split("/", 1)[1].startswith(prefix)]
    items = "".join(
        f"<Blob><Name>{n}</Name><Properties><Content-Length>{len(blobs[container + '/' + n])}</Content-Length>"
        "<BlobType>BlockBlob</BlobType></Properties></Blob>"
        for n in names
    )
    return (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ContainerName="{container}">'
            f"<Prefix>{prefix}</Prefix><Blobs>{items}</Blobs><NextMarker /></EnumerationResults>").encode()  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    owner: AzureStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
        req = Request(self.command, self.headers.get("Host", ""), unquote(parts.path), dict(parse_qsl(parts.query)),
                      headers, raw)  # fmt: skip
        try:
            resp = self.owner.handle(req)
        except Exception as exc:  # a bug in the stand-in: show it to the test as a 500 with the reason
            resp = Response(500, azure_error("StandinBug", f"{type(exc).__name__}: {exc}"))
        if isinstance(resp.body, (bytes, bytearray)):
            data = bytes(resp.body)
        elif resp.body is None:
            data = b""
        else:
            data = json.dumps(resp.body).encode()
        self.send_response(resp.status)
        headers = {"x-ms-request-id": str(uuid.uuid4()), **resp.headers}
        if resp.body is not None and not isinstance(resp.body, (bytes, bytearray)):
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        for k, v in headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(data))) if self.command == "HEAD"
                         else str(len(data)))  # fmt: skip
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _serve


class _ConnectProxy(socketserver.StreamRequestHandler):
    """CONNECT host:443 -> a TCP tunnel to the stand-in's TLS port, whatever the host (the cert names it)."""

    owner: AzureStandin

    def handle(self) -> None:
        line = self.rfile.readline(65536).decode("latin-1")
        while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
            pass
        method, target = (line.split() + ["", ""])[:2]
        if method != "CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.owner.proxied_hosts.append(target)
        upstream = socket.create_connection(("127.0.0.1", self.owner.port), timeout=30)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        client = self.connection
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 30)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        finally:
            upstream.close()
