"""The MLClient, its credential, and the Azure errors this project expects, turned into messages that say what to do."""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import config

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)

PUBLIC_ARM_URL = "https://management.azure.com"
# DefaultAzureCredential walks a chain (env, managed identity, CLI, ...); off Azure the managed-identity
# probe alone can take seconds. Past this a missing login should not look like a hang.
TOKEN_TIMEOUT_S = 30.0

LOGIN_HINT = (
    "sign in with `az login` (and AZURE_CREDENTIAL=cli), or set AZURE_CLIENT_ID, AZURE_TENANT_ID and "
    "AZURE_CLIENT_SECRET for a service principal (AZURE_CREDENTIAL=default)"
)


def make_credential(settings: config.Settings) -> "TokenCredential":
    if settings.AZURE_CREDENTIAL == "cli":
        from azure.identity import AzureCliCredential

        return AzureCliCredential(process_timeout=20)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def arm_url(cloud: str = "AzureCloud") -> str:
    """The Resource Manager base URL of an azure-ai-ml cloud name (sovereign clouds have their own)."""
    if cloud == "AzureCloud":
        return PUBLIC_ARM_URL  # no SDK import for the common case
    from azure.ai.ml._azure_environments import _get_base_url_from_metadata

    return _get_base_url_from_metadata(cloud_name=cloud).rstrip("/")


def arm_scope(cloud: str = "AzureCloud") -> str:
    return f"{arm_url(cloud)}/.default"


def probe_credential(
    credential: "TokenCredential", timeout: float = TOKEN_TIMEOUT_S, cloud: str = "AzureCloud"
) -> str | None:
    """None when the credential yields an ARM token within `timeout`, else why not (with the fix)."""
    from azure.core.exceptions import ClientAuthenticationError

    outcome: dict[str, BaseException | None] = {}
    scope = arm_scope(cloud)

    def fetch() -> None:
        try:
            credential.get_token(scope)
            outcome["error"] = None
        except BaseException as exc:  # handed to the calling thread, which re-raises what it does not expect
            outcome["error"] = exc

    # A daemon thread, so that a credential stuck on a network call cannot keep the process alive.
    worker = threading.Thread(target=fetch, name="azure-token-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"no Azure token within {timeout:g} s (network or login problem): {LOGIN_HINT}"
    error = outcome["error"]
    if error is None:
        return None
    if not isinstance(error, ClientAuthenticationError):  # CredentialUnavailableError is one of these
        raise error
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"Azure refused the credential ({first_line}): {LOGIN_HINT}"


def connect(
    settings: config.Settings,
    *,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
    probe: bool = True,
) -> "MLClient":
    """An MLClient for the configured workspace, after checking the config and that a token can be had.

    Fails fast with RuntimeError / ConfigError (never a traceback from deep inside the SDK) when
    the workspace values are placeholders or the credential is refused.
    """
    if ml_client is not None:
        return ml_client
    config.validate(settings, config.AZURE_WORKSPACE_FIELDS)
    credential = credential or make_credential(settings)
    problem = probe_credential(credential, cloud=settings.AZURE_CLOUD) if probe else None
    if problem:
        raise RuntimeError(problem)
    from azure.ai.ml import MLClient

    with azure_errors(f"AZURE_CLOUD={settings.AZURE_CLOUD}"):  # an unknown cloud name is an MlException
        return MLClient(
            credential,
            subscription_id=settings.AZURE_SUBSCRIPTION_ID,
            resource_group_name=settings.AZURE_RESOURCE_GROUP_NAME,
            workspace_name=settings.AZURE_ML_WORKSPACE_NAME,
            cloud=settings.AZURE_CLOUD,
        )


def connect_registry(
    settings: config.Settings,
    *,
    registry_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
) -> "MLClient":
    """An MLClient for AZURE_CATALOG_REGISTRY (the model catalog), reading only."""
    if registry_client is not None:
        return registry_client
    credential = credential or make_credential(settings)
    from azure.ai.ml import MLClient

    # Construction asks the registry discovery service where the registry lives: a network call.
    with azure_errors(f"registry {settings.AZURE_CATALOG_REGISTRY}"):
        return MLClient(credential, registry_name=settings.AZURE_CATALOG_REGISTRY, cloud=settings.AZURE_CLOUD)


def is_quota_error(exc: BaseException) -> bool:
    code = str(getattr(getattr(exc, "error", None), "code", "") or "")
    text = f"{code} {exc}".lower()
    return "quota" in text


@contextmanager
def azure_errors(action: str, quota_hint: str = "", failed_hint: str = "") -> Iterator[None]:
    """Turn the Azure failures we expect into RuntimeError naming the step and the fix.

    `failed_hint` is added when the service answered with an error other than quota or permission,
    e.g. a long-running operation that ended Failed (the poller raises HttpResponseError for it).
    """
    from azure.ai.ml.exceptions import MlException, ValidationException
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    try:
        yield
    except ClientAuthenticationError as exc:
        raise RuntimeError(f"{action}: Azure refused the credential: {LOGIN_HINT}") from exc
    except ServiceRequestError as exc:  # DNS, proxy, no route: the request never reached Azure
        raise RuntimeError(f"{action}: cannot reach Azure ({_first_line(exc)}); check the network or proxy") from exc
    except HttpResponseError as exc:
        reason = _first_line(exc)
        if is_quota_error(exc):
            raise RuntimeError(f"{action}: not enough quota ({reason}). {quota_hint}".strip()) from exc
        if exc.status_code == 404:
            raise RuntimeError(
                f"{action}: Azure says it does not exist ({reason}); check AZURE_SUBSCRIPTION_ID, "
                "AZURE_RESOURCE_GROUP_NAME, AZURE_ML_WORKSPACE_NAME and the names you passed "
                "(`python deploy_model.py --backend azure --check` verifies the workspace)"
            ) from exc
        if exc.status_code == 403:
            raise RuntimeError(
                f"{action}: permission denied ({reason}). Your account needs at least the Contributor role "
                "on the workspace's resource group (`python setup_ml.py --backend azure --check` lists the fixes)"
            ) from exc
        raise RuntimeError(f"{action} failed: {reason}" + (f"; {failed_hint}" if failed_hint else "")) from exc
    except ValidationException as exc:
        raise RuntimeError(f"{action}: the Azure ML SDK rejected the definition: {_first_line(exc)}") from exc
    except MlException as exc:  # DeploymentException, ModelException, JobException, ...: the SDK's own checks
        raise RuntimeError(f"{action} failed: {_first_line(exc)}") from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """The line of an Azure error that says what went wrong.

    The SDK's own validation errors are colored, multi-line reports whose reasons are the `(x) ...`
    lines; Azure's HTTP errors put the reason on their first line.
    """
    text = _ANSI.sub("", str(getattr(exc, "message", None) or exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line.removeprefix("(x)").strip() for line in lines if line.startswith("(x)")]
    if reasons:
        return "; ".join(reasons)
    return lines[0] if lines else type(exc).__name__


def arm_get(
    credential: "TokenCredential", path: str, api_version: str, *, cloud: str = "AzureCloud"
) -> dict[str, Any] | None:
    """GET an Azure Resource Manager resource of `cloud`; None when it does not exist (404).

    The identity and role-assignment checks need nothing more, so no management SDK is pulled in.
    """
    from azure.core import PipelineClient
    from azure.core.exceptions import HttpResponseError
    from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy, UserAgentPolicy
    from azure.core.rest import HttpRequest

    base_url = arm_url(cloud)
    policies = [
        UserAgentPolicy(user_agent="finetune-phi-preflight"),
        RetryPolicy(total=2),
        BearerTokenCredentialPolicy(credential, arm_scope(cloud)),
    ]
    sep = "&" if "?" in path else "?"
    with PipelineClient(base_url=base_url, policies=policies) as client:
        request = HttpRequest("GET", f"{base_url}{path}{sep}api-version={api_version}")
        response = client.send_request(request, connection_timeout=10, read_timeout=30)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise HttpResponseError(response=response)
        return response.json()
