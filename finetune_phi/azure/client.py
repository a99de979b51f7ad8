"""The MLClient, its credential, and the Azure errors this project expects, turned into messages that say what to do."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import config

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)

ARM_SCOPE = "https://management.azure.com/.default"
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


def probe_credential(credential: "TokenCredential", timeout: float = TOKEN_TIMEOUT_S) -> str | None:
    """None when the credential yields an ARM token within `timeout`, else why not (with the fix)."""
    from azure.core.exceptions import ClientAuthenticationError

    outcome: dict[str, BaseException | None] = {}

    def fetch() -> None:
        try:
            credential.get_token(ARM_SCOPE)
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
    problem = probe_credential(credential) if probe else None
    if problem:
        raise RuntimeError(problem)
    from azure.ai.ml import MLClient

    return MLClient(
        credential,
        subscription_id=settings.AZURE_SUBSCRIPTION_ID,
        resource_group_name=settings.AZURE_RESOURCE_GROUP_NAME,
        workspace_name=settings.AZURE_ML_WORKSPACE_NAME,
    )


def is_quota_error(exc: BaseException) -> bool:
    code = str(getattr(getattr(exc, "error", None), "code", "") or "")
    text = f"{code} {exc}".lower()
    return "quota" in text


@contextmanager
def azure_errors(action: str, quota_hint: str = "") -> Iterator[None]:
    """Turn the Azure failures we expect into RuntimeError naming the step and the fix."""
    from azure.ai.ml.exceptions import ValidationException
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
        if exc.status_code == 403:
            raise RuntimeError(
                f"{action}: permission denied ({reason}). Your account needs at least the Contributor role "
                "on the workspace's resource group (`python setup_ml.py --backend azure --check` lists the fixes)"
            ) from exc
        raise RuntimeError(f"{action} failed: {reason}") from exc
    except ValidationException as exc:
        raise RuntimeError(f"{action}: the Azure ML SDK rejected the definition: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def arm_get(credential: "TokenCredential", path: str, api_version: str) -> dict[str, Any] | None:
    """GET an Azure Resource Manager resource; None when it does not exist (404).

    The identity and role-assignment checks need nothing more, so no management SDK is pulled in.
    """
    from azure.core import PipelineClient
    from azure.core.exceptions import HttpResponseError
    from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy, UserAgentPolicy
    from azure.core.rest import HttpRequest

    policies = [
        UserAgentPolicy(user_agent="finetune-phi-preflight"),
        RetryPolicy(total=2),
        BearerTokenCredentialPolicy(credential, ARM_SCOPE),
    ]
    sep = "&" if "?" in path else "?"
    with PipelineClient(base_url="https://management.azure.com", policies=policies) as client:
        request = HttpRequest("GET", f"https://management.azure.com{path}{sep}api-version={api_version}")
        response = client.send_request(request, connection_timeout=10, read_timeout=30)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise HttpResponseError(response=response)
        return response.json()
