"""Read-only preflight for the Azure backend: every problem it can find, at once, each with its fix.

    python setup_ml.py --backend azure --check
    python deploy_model.py --backend azure --check

Order: configuration (offline: placeholders, retired VM sizes, the deployment VM against the model),
then the credential, the workspace, the managed identity and its role assignments, the VM-family
quota and, for the catalog modes, the catalog model's retirement dates and deploy regions. A step that cannot run (no credential, say) skips the
steps that depend on it rather than adding noise.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Callable

import config
from finetune_phi.azure import client, entities, lifecycle

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)

# (path, api_version) -> the resource as JSON, or None when it does not exist.
ArmGet = Callable[[str, str], "dict[str, Any] | None"]

IDENTITY_API_VERSION = "2023-01-31"
ROLE_ASSIGNMENTS_API_VERSION = "2022-04-01"

# Built-in role definition ids (the same in every tenant).
CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
STORAGE_BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
ACR_PULL = "7f951dda-4ed3-4680-a7ca-43fe172d538d"
ROLE_NAMES = {CONTRIBUTOR: "Contributor", STORAGE_BLOB_DATA_READER: "Storage Blob Data Reader", ACR_PULL: "AcrPull"}

# Managed online deployments reserve 20% extra capacity for rolling upgrades.
DEPLOYMENT_QUOTA_FACTOR = 1.2

_IDENTITY_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/([^/]+)$",
    re.IGNORECASE,
)


def check(
    settings: config.Settings,
    *,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
    arm_get: ArmGet | None = None,
    mode: str = "command",
    registry_client: "MLClient | None" = None,
    uses: tuple[str, ...] = ("fine-tuning", "inference"),
) -> list[str]:
    """Every problem found for a run in `mode` (command, catalog, serverless), as lines that say what to
    do; an empty list means ready to go. Warnings (a retirement within 90 days) are logged."""
    serverless = mode == "serverless"
    problems = config_problems(settings, serverless=serverless)
    if config.missing(settings, config.AZURE_WORKSPACE_FIELDS):
        return problems  # nothing online can be checked without the workspace coordinates
    if ml_client is None:
        credential = credential or client.make_credential(settings)
        refused = client.probe_credential(credential, cloud=settings.AZURE_CLOUD)
        if refused:
            return problems + [f"credential: {refused}"]
        ml_client = client.connect(settings, credential=credential, probe=False)
    if arm_get is None and credential is not None:
        arm_get = functools.partial(client.arm_get, credential, cloud=settings.AZURE_CLOUD)

    workspace, problem = _workspace(settings, ml_client)
    if problem:
        return problems + [problem]
    if not serverless:  # a serverless endpoint runs as no identity of ours, on no VM of ours
        if arm_get is not None and not config.missing(settings, config.AZURE_IDENTITY_FIELDS):
            problems += identity_problems(settings, workspace, arm_get)
        problems += quota_problems(settings, ml_client)
    if mode in ("catalog", "serverless"):
        problems += catalog_problems(settings, workspace, mode, registry_client=registry_client, credential=credential,
                                     uses=uses)  # fmt: skip
    return problems


def catalog_problems(
    settings: config.Settings, workspace: Any, mode: str, *,
    registry_client: "MLClient | None" = None, credential: "TokenCredential | None" = None,
    uses: tuple[str, ...] = ("fine-tuning", "inference"),
) -> list[str]:
    """The catalog model exists, is not retired for `uses` (fine-tuning, inference), and (serverless)
    its fine-tuned copies can be deployed in the workspace's region."""
    try:
        registry_client = client.connect_registry(settings, registry_client=registry_client, credential=credential)
        model = lifecycle.fetch_catalog_model(settings, registry_client)
    except RuntimeError as exc:
        return [f"catalog model: {exc}"]
    region = str(getattr(workspace, "location", "") or "").lower() if mode == "serverless" else None
    problems, warnings = lifecycle.lifecycle_problems(model, uses, region=region or None)
    for warning in warnings:
        log.warning("%s", warning)
    return problems


def config_problems(settings: config.Settings, *, serverless: bool = False) -> list[str]:
    """Offline checks of the values the Azure steps use (`serverless`: no cluster, no managed endpoint)."""
    if serverless:
        problems = config.missing(settings, config.AZURE_WORKSPACE_FIELDS)
        if not entities.ENDPOINT_NAME_RE.match(settings.AZURE_ENDPOINT_NAME):
            problems.append(
                f"AZURE_ENDPOINT_NAME={settings.AZURE_ENDPOINT_NAME!r}: use 3-32 letters, digits and hyphens, "
                "starting with a letter (and unique in the Azure region)"
            )
        return problems + _data_problems(settings)
    problems = config.missing(settings, config.AZURE_WORKSPACE_FIELDS + config.AZURE_IDENTITY_FIELDS)
    problems += lifecycle.retired_size_problems(settings, ("AZURE_COMPUTE_SIZE", "AZURE_DEPLOYMENT_INSTANCE_TYPE"))
    resource_id = settings.AZURE_MANAGED_IDENTITY_RESOURCE_ID
    match = _IDENTITY_ID.match(resource_id)
    if config.PLACEHOLDER_PREFIX not in resource_id and resource_id.strip():
        if not match:
            problems.append(
                "AZURE_MANAGED_IDENTITY_RESOURCE_ID must look like /subscriptions/<id>/resourceGroups/<rg>/providers/"
                "Microsoft.ManagedIdentity/userAssignedIdentities/<name> "
                "(`az identity show -g <rg> -n <name> --query id`)"
            )
        elif (
            config.PLACEHOLDER_PREFIX not in settings.AZURE_MANAGED_IDENTITY_NAME
            and match.group(1) != settings.AZURE_MANAGED_IDENTITY_NAME
        ):
            problems.append(
                f"AZURE_MANAGED_IDENTITY_RESOURCE_ID names identity {match.group(1)!r} but AZURE_MANAGED_IDENTITY_NAME "
                f"is {settings.AZURE_MANAGED_IDENTITY_NAME!r}: make them agree"
            )
    if not entities.ENDPOINT_NAME_RE.match(settings.AZURE_ENDPOINT_NAME):
        problems.append(
            f"AZURE_ENDPOINT_NAME={settings.AZURE_ENDPOINT_NAME!r}: use 3-32 letters, digits and hyphens, "
            "starting with a letter (and unique in the Azure region)"
        )
    for name in ("AZURE_COMPUTE_MAX_INSTANCES", "AZURE_JOB_INSTANCE_COUNT", "AZURE_JOB_PROCESSES_PER_NODE",
                 "AZURE_DEPLOYMENT_INSTANCE_COUNT", "AZURE_DEPLOYMENT_MAX_CONCURRENT_REQUESTS"):  # fmt: skip
        if getattr(settings, name) < 1:
            problems.append(f"{name}={getattr(settings, name)}: use 1 or more")
    if settings.AZURE_COMPUTE_MIN_INSTANCES < 0:
        problems.append(f"AZURE_COMPUTE_MIN_INSTANCES={settings.AZURE_COMPUTE_MIN_INSTANCES}: use 0 or more")
    if settings.AZURE_JOB_INSTANCE_COUNT > settings.AZURE_COMPUTE_MAX_INSTANCES:
        problems.append(
            f"AZURE_JOB_INSTANCE_COUNT={settings.AZURE_JOB_INSTANCE_COUNT} nodes exceeds AZURE_COMPUTE_MAX_INSTANCES="
            f"{settings.AZURE_COMPUTE_MAX_INSTANCES}: raise the cluster's maximum or use fewer nodes"
        )
    return problems + _data_problems(settings) + fit_problems(settings)


def _data_problems(settings: config.Settings) -> list[str]:
    return [
        f"{name}: {path} does not exist; run `python download_dataset.py` first"
        for path, name in ((settings.train_data_path, "TRAIN_DATA_PATH"), (settings.test_data_path, "TEST_DATA_PATH"))
        if not path.is_file()
    ]


# --- does the model fit the deployment's VM? -----------------------------------------------------------

# Parameters of the models a deployment may serve (their model cards). The catalog job always
# fine-tunes Phi-3-mini; a command job serves BASE_MODEL, merged with its LoRA adapter.
MODEL_PARAMS = {
    "microsoft/phi-3-mini-4k-instruct": 3.82e9,
    "microsoft/phi-3-mini-128k-instruct": 3.82e9,
    "microsoft/phi-3.5-mini-instruct": 3.82e9,
    # 200k-token vocabulary whose embedding the output layer shares (tied): 3.84e9 in all.
    "microsoft/phi-4-mini-instruct": 3.84e9,
    "microsoft/phi-3-small-8k-instruct": 7.39e9,
    "microsoft/phi-3-medium-4k-instruct": 14.0e9,
    "microsoft/phi-3-medium-128k-instruct": 14.0e9,
    "tiny": 1.1e6,
}
CATALOG_BASE_MODEL = "microsoft/phi-3-mini-4k-instruct"

# (RAM, GPU memory) in GiB of the sizes managed online endpoints offer for models of this scale
# (learn.microsoft.com/azure/machine-learning/reference-managed-online-endpoints-vm-sku-list).
SKU_MEMORY_GIB: dict[str, tuple[float, float]] = {
    "Standard_DS2_v2": (7, 0), "Standard_DS3_v2": (14, 0), "Standard_DS4_v2": (28, 0), "Standard_DS5_v2": (56, 0),
    "Standard_F4s_v2": (8, 0), "Standard_F8s_v2": (16, 0), "Standard_F16s_v2": (32, 0), "Standard_F32s_v2": (64, 0),
    "Standard_E2s_v3": (16, 0), "Standard_E4s_v3": (32, 0), "Standard_E8s_v3": (64, 0),
    "Standard_E16s_v3": (128, 0), "Standard_E32s_v3": (256, 0), "Standard_E64s_v3": (432, 0),
    "Standard_NC4as_T4_v3": (28, 16), "Standard_NC8as_T4_v3": (56, 16), "Standard_NC16as_T4_v3": (110, 16),
    "Standard_NC6s_v3": (112, 16), "Standard_NC12s_v3": (224, 32), "Standard_NC24s_v3": (448, 64),
    "Standard_NC24ads_A100_v4": (220, 80), "Standard_NC48ads_A100_v4": (440, 160),
    "Standard_NC96ads_A100_v4": (880, 320), "Standard_ND96asr_v4": (900, 320),
}  # fmt: skip

# Azure's no-code MLflow scoring loads a transformers model with its default dtype, fp32, on CPU
# (4 bytes a parameter: 14.2 GiB for Phi-3-mini). Peak use is about twice that: the bf16 checkpoint
# is read while the fp32 model is built, and a 4k-token request adds a 3 GiB fp32 KV cache plus
# activations. Add the inference server, and keep 10% of the VM for the OS and Azure's node agents.
FP32_BYTES_PER_PARAM = 4
PEAK_FACTOR = 2.0
SERVER_GIB = 2.0
USABLE_FRACTION = 0.9


def deployed_model(settings: config.Settings) -> str:
    """The base model the deployment will serve: what the recorded training job fine-tuned."""
    from finetune_phi import common

    training = common.read_state(settings).get("training", {})
    if training.get("backend") == "azure" and training.get("mode") == "catalog":
        return CATALOG_BASE_MODEL
    return settings.BASE_MODEL


def memory_need_gib(params: float) -> float:
    return params * FP32_BYTES_PER_PARAM / 2**30 * PEAK_FACTOR + SERVER_GIB


def fit_problems(settings: config.Settings) -> list[str]:
    """Offline: will the deployed model fit in AZURE_DEPLOYMENT_INSTANCE_TYPE's memory? Unknowns only warn."""
    sku = settings.AZURE_DEPLOYMENT_INSTANCE_TYPE
    model = deployed_model(settings)
    params = MODEL_PARAMS.get(model.lower())
    if params is None:
        log.warning("memory check skipped: the size of %s is not known here (check that %s holds it)", model, sku)
        return []
    memory = {name.lower(): m for name, m in SKU_MEMORY_GIB.items()}.get(sku.lower())
    need = memory_need_gib(params)
    if memory is None:
        log.warning(
            "memory check skipped: AZURE_DEPLOYMENT_INSTANCE_TYPE=%s is not in the table of known sizes; "
            "%s needs about %.0f GiB of RAM", sku, model, need,
        )  # fmt: skip
        return []
    ram, gpu = memory
    if ram * USABLE_FRACTION >= need:
        if gpu and gpu * USABLE_FRACTION < params * FP32_BYTES_PER_PARAM / 2**30:
            log.warning(
                "%s has %g GiB of GPU memory: %s in fp32 (%.0f GiB) will not fit on the GPU unless the model "
                "was logged with a 16-bit dtype", sku, gpu, model, params * FP32_BYTES_PER_PARAM / 2**30,
            )  # fmt: skip
        return []
    # The memory-optimised E series is the cheapest RAM per hour among these CPU sizes.
    fits = sorted(
        (not name.startswith("Standard_E"), r, name)
        for name, (r, g) in SKU_MEMORY_GIB.items()
        if not g and r * USABLE_FRACTION >= need
    )
    suggestion = fits[0][2] if fits else "a larger size"
    return [
        f"AZURE_DEPLOYMENT_INSTANCE_TYPE={sku} has {ram:g} GiB of RAM ({ram * USABLE_FRACTION:.0f} usable) but "
        f"serving {model} needs about {need:.0f} GiB (fp32 weights {params * FP32_BYTES_PER_PARAM / 2**30:.1f} GiB, "
        f"about twice that while loading and generating): set AZURE_DEPLOYMENT_INSTANCE_TYPE={suggestion} or larger"
    ]



def _workspace(settings: config.Settings, ml_client: "MLClient") -> tuple[Any, str | None]:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

    where = f"resource group {settings.AZURE_RESOURCE_GROUP_NAME!r} of subscription {settings.AZURE_SUBSCRIPTION_ID}"
    try:
        return ml_client.workspaces.get(settings.AZURE_ML_WORKSPACE_NAME), None
    except ResourceNotFoundError:
        return None, (
            f"workspace: {settings.AZURE_ML_WORKSPACE_NAME!r} not found in {where}: check AZURE_ML_WORKSPACE_NAME, "
            "AZURE_RESOURCE_GROUP_NAME and AZURE_SUBSCRIPTION_ID (`az ml workspace list -g <rg>`)"
        )
    except ClientAuthenticationError as exc:
        return None, f"credential: Azure refused it ({_first_line(exc)}): {client.LOGIN_HINT}"
    except HttpResponseError as exc:
        return None, (
            f"workspace: cannot read {settings.AZURE_ML_WORKSPACE_NAME!r} in {where} ({_first_line(exc)}): "
            "your account needs at least Reader there (Contributor to run jobs)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def identity_problems(settings: config.Settings, workspace: Any, arm_get: ArmGet) -> list[str]:
    """The managed identity exists, matches the client id, and holds the roles the endpoint needs."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    name = settings.AZURE_MANAGED_IDENTITY_NAME
    resource_id = settings.AZURE_MANAGED_IDENTITY_RESOURCE_ID
    try:
        identity = arm_get(resource_id, IDENTITY_API_VERSION)
    except (ClientAuthenticationError, HttpResponseError) as exc:
        return [f"managed identity: cannot read {resource_id} ({_first_line(exc)}); check the id and your access"]
    if identity is None:
        return [
            f"managed identity: {resource_id} not found: create it with `az identity create --name {name} "
            f"--resource-group {settings.AZURE_RESOURCE_GROUP_NAME}` and set AZURE_MANAGED_IDENTITY_CLIENT_ID from "
            "its clientId and AZURE_MANAGED_IDENTITY_RESOURCE_ID from its id"
        ]
    properties = identity.get("properties", {})
    problems = []
    client_id = properties.get("clientId", "")
    if client_id and client_id.lower() != settings.AZURE_MANAGED_IDENTITY_CLIENT_ID.lower():
        problems.append(
            f"AZURE_MANAGED_IDENTITY_CLIENT_ID={settings.AZURE_MANAGED_IDENTITY_CLIENT_ID} but identity {name} has "
            f"clientId {client_id}: set AZURE_MANAGED_IDENTITY_CLIENT_ID={client_id}"
        )
    required = required_roles(settings, workspace)
    principal_id = properties.get("principalId")
    assignments_path = (
        f"/subscriptions/{settings.AZURE_SUBSCRIPTION_ID}/providers/Microsoft.Authorization/roleAssignments"
        f"?$filter=assignedTo('{principal_id}')"
    )
    try:
        listed = arm_get(assignments_path, ROLE_ASSIGNMENTS_API_VERSION) if principal_id else None
    except (ClientAuthenticationError, HttpResponseError) as exc:
        missing = required
        problems.append(f"role assignments of {name}: cannot list them ({_first_line(exc)}); make sure these exist:")
    else:
        held = [
            (a["properties"]["roleDefinitionId"].rsplit("/", 1)[-1].lower(), a["properties"]["scope"].lower())
            for a in (listed or {}).get("value", [])
        ]
        missing = [
            (role, scope)
            for role, scope in required
            if not any(r == role and (scope.lower() + "/").startswith(s.rstrip("/") + "/") for r, s in held)
        ]
    for role, scope in missing:
        problems.append(
            f"managed identity {name} lacks {ROLE_NAMES[role]} on {scope}: "
            f"az role assignment create --assignee {settings.AZURE_MANAGED_IDENTITY_CLIENT_ID} "
            f'--role "{ROLE_NAMES[role]}" --scope {scope}'
        )
    return problems


def required_roles(settings: config.Settings, workspace: Any) -> list[tuple[str, str]]:
    """(role id, scope) pairs the endpoint's identity needs: the tutorial's three assignments."""
    group = f"/subscriptions/{settings.AZURE_SUBSCRIPTION_ID}/resourceGroups/{settings.AZURE_RESOURCE_GROUP_NAME}"
    # A workspace creates its registry lazily; until then the group scope covers the one it will get.
    storage = getattr(workspace, "storage_account", None) or group
    registry = getattr(workspace, "container_registry", None) or group
    return [(CONTRIBUTOR, group), (STORAGE_BLOB_DATA_READER, storage), (ACR_PULL, registry)]


def quota_problems(settings: config.Settings, ml_client: "MLClient") -> list[str]:
    """Enough free vCPUs in each VM family the cluster and the deployment use, in the workspace's region."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    try:
        sizes = {s.name.lower(): s for s in ml_client.compute.list_sizes()}
        usages = {_usage_family(u).lower(): u for u in ml_client.compute.list_usage()}
    except (ClientAuthenticationError, HttpResponseError) as exc:
        return [f"quota: cannot read VM sizes and usage ({_first_line(exc)}); check them under ml.azure.com → Quota"]
    needs: dict[str, list[tuple[str, str, int]]] = {}  # family -> (what, size, vCPUs)
    problems = []
    deployment_instances = math.ceil(settings.AZURE_DEPLOYMENT_INSTANCE_COUNT * DEPLOYMENT_QUOTA_FACTOR)
    wants = [
        ("training", settings.AZURE_COMPUTE_SIZE, settings.AZURE_JOB_INSTANCE_COUNT, "AZURE_COMPUTE_SIZE"),
        ("the deployment", settings.AZURE_DEPLOYMENT_INSTANCE_TYPE, deployment_instances,
         "AZURE_DEPLOYMENT_INSTANCE_TYPE"),
    ]  # fmt: skip
    for what, size_name, count, field in wants:
        size = sizes.get(size_name.lower())
        if size is None:
            problems.append(
                f"quota: {field}={size_name} is not offered in the workspace's region: pick a size from "
                "`az ml compute list-sizes` or use a workspace in another region"
            )
            continue
        needs.setdefault(size.family, []).append((what, size_name, int(_field(size, "v_cp_us", "vCPUs") or 0) * count))
    for family, wanted in needs.items():
        usage = usages.get(str(family).lower())
        need = sum(v for _, _, v in wanted)
        if usage is None:
            continue  # the service reports no limit for this family
        free = int(usage.limit or 0) - int(_field(usage, "current_value", "currentValue") or 0)
        if free < need:
            parts = " + ".join(f"{v} for {what} ({size})" for what, size, v in wanted)
            problems.append(
                f"quota: VM family {family} needs {need} vCPUs ({parts}) but {free} of {usage.limit} are free: "
                f"request more for {family} (ml.azure.com → Quota, or the portal's Quotas → Machine learning), "
                "or choose a size you have quota for"
            )
    return problems


# azure-ai-ml 1.35.2 builds VmSize and Usage from its REST models' as_dict(), which keys them by the
# wire names: over HTTP `vCPUs`, `currentValue` and a `name` dict are set while `v_cp_us`,
# `current_value` stay None (found driving the real SDK against tests/azure_standin.py). Read both.
def _field(entity: Any, python_name: str, wire_name: str) -> Any:
    value = getattr(entity, python_name, None)
    return value if value is not None else getattr(entity, wire_name, None)


def _usage_family(usage: Any) -> str:
    name = usage.name
    if isinstance(name, dict):
        return str(name.get("value", ""))
    return str(getattr(name, "value", name))
