"""The read-only preflight: every problem at once, each with the command or setting that fixes it.

The workspace, identity, role and quota reads through the real SDK are in test_azure_wire.py; these
cover the checks' own logic (which roles, which arithmetic, which message) with a hand-written fake.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from azure.ai.ml.entities import Usage, UsageName, VmSize
from azure.core.exceptions import HttpResponseError

import config
from fake_mlclient import (
    FILLED_IN,
    IDENTITY_CLIENT_ID,
    IDENTITY_RESOURCE_ID,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    WORKSPACE,
    FakeMLClient,
    RefusingCredential,
    azure_settings,
)
from finetune_phi.azure import client, preflight, workflow

REPO = Path(__file__).resolve().parents[1]
GROUP = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
STORAGE = f"{GROUP}/providers/Microsoft.Storage/storageAccounts/wsphistorage"
REGISTRY = f"{GROUP}/providers/Microsoft.ContainerRegistry/registries/wsphiacr"
PRINCIPAL = "pppppppp-0000-0000-0000-000000000000"


def _workspace() -> Any:
    return SimpleNamespace(name=WORKSPACE, location="eastus2", storage_account=STORAGE, container_registry=REGISTRY)


def _sizes_and_usage(a100_limit: int = 96, e_limit: int = 100) -> dict[str, list]:
    return {
        "sizes": [
            VmSize(name="Standard_NC24ads_A100_v4", family="standardNCADSA100v4Family", v_cp_us=24, gpus=1),
            VmSize(name="Standard_E8s_v3", family="standardESv3Family", v_cp_us=8),
        ],
        "usages": [
            Usage(name=UsageName(value="standardNCADSA100v4Family"), current_value=0, limit=a100_limit, unit="Count"),
            Usage(name=UsageName(value="standardESv3Family"), current_value=8, limit=e_limit, unit="Count"),
        ],
    }


def _arm(roles: tuple[str, ...] = (preflight.CONTRIBUTOR, preflight.STORAGE_BLOB_DATA_READER, preflight.ACR_PULL),
         identity_exists: bool = True, client_id: str = IDENTITY_CLIENT_ID):  # fmt: skip
    scopes = {preflight.CONTRIBUTOR: GROUP, preflight.STORAGE_BLOB_DATA_READER: STORAGE, preflight.ACR_PULL: REGISTRY}
    asked: list[str] = []

    def arm_get(path: str, api_version: str) -> dict | None:
        asked.append(path)
        if path == IDENTITY_RESOURCE_ID:
            return {"properties": {"clientId": client_id, "principalId": PRINCIPAL}} if identity_exists else None
        if "roleAssignments" in path and PRINCIPAL in path:
            return {"value": [
                {"properties": {"roleDefinitionId": f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Authorization/"
                                                    f"roleDefinitions/{role}", "scope": scopes[role]}}
                for role in roles
            ]}  # fmt: skip
        raise AssertionError(f"unexpected ARM GET {path}")

    arm_get.asked = asked  # type: ignore[attr-defined]
    return arm_get


def test_placeholders_are_all_listed_at_once_without_any_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_credential(settings: config.Settings) -> None:
        raise AssertionError("no credential may be built while the workspace values are placeholders")

    monkeypatch.setattr(client, "make_credential", no_credential)
    problems = workflow.check(azure_settings(tmp_path, filled_in=False, data=False))
    text = "\n".join(problems)
    for name in FILLED_IN:
        assert f"{name} still holds the placeholder" in text or f"{name} is built from" in text, name
    assert "TRAIN_DATA_PATH" in text and "download_dataset.py" in text


def test_check_cli_with_placeholders_exits_1_listing_every_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in FILLED_IN and k != "BACKEND"}
    env["STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.run(
        [sys.executable, "setup_ml.py", "--backend", "azure", "--check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in FILLED_IN:
        assert f"{name} still holds the placeholder" in proc.stderr or f"{name} is built from" in proc.stderr, name
    assert "Traceback" not in proc.stderr


def test_bad_values_are_named_with_their_fix(tmp_path: Path) -> None:
    s = azure_settings(
        tmp_path,
        AZURE_MANAGED_IDENTITY_RESOURCE_ID="/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/other-identity",
        AZURE_ENDPOINT_NAME="9-starts-with-a-digit",
        AZURE_JOB_INSTANCE_COUNT=4,
    )
    text = "\n".join(preflight.config_problems(s))
    assert "names identity 'other-identity'" in text
    assert "AZURE_ENDPOINT_NAME='9-starts-with-a-digit'" in text
    assert "AZURE_JOB_INSTANCE_COUNT=4 nodes exceeds AZURE_COMPUTE_MAX_INSTANCES=1" in text


def _must_not_run(name: str) -> Any:
    def called(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran after the credential was refused")

    return called


def test_refused_credential_is_reported_at_once_and_stops_the_online_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the credential, check() would build an MLClient and read the workspace, the identity and
    # the quota: none of that may happen once the credential is refused.
    monkeypatch.setattr(client, "connect", _must_not_run("client.connect"))
    monkeypatch.setattr(client, "arm_get", _must_not_run("client.arm_get"))
    refusing = RefusingCredential()
    problems = workflow.check(azure_settings(tmp_path), credential=refusing)
    # "At once": the first refusal is the answer. One token request, and the refusal's own message,
    # not the "no Azure token within ..." the probe gives when it waits out its timeout.
    assert refusing.calls == 1
    assert len(problems) == 1 and problems[0].startswith("credential: Azure refused the credential")
    assert "az login" in problems[0] and "AZURE_CLIENT_SECRET" in problems[0]


def test_missing_role_assignments_come_with_the_az_commands(tmp_path: Path) -> None:
    fake = FakeMLClient(workspace=_workspace(), **_sizes_and_usage())
    problems = workflow.check(azure_settings(tmp_path), ml_client=fake, arm_get=_arm(roles=(preflight.CONTRIBUTOR,)))
    assert problems == [
        f"managed identity phi-endpoint-identity lacks {role} on {scope}: az role assignment create "
        f'--assignee {IDENTITY_CLIENT_ID} --role "{role}" --scope {scope}'
        for role, scope in (("Storage Blob Data Reader", STORAGE), ("AcrPull", REGISTRY))
    ]


def test_identity_missing_or_mismatched(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    fake = FakeMLClient(workspace=_workspace(), **_sizes_and_usage())
    (missing,) = workflow.check(s, ml_client=fake, arm_get=_arm(identity_exists=False))
    assert "not found" in missing and f"az identity create --name {s.AZURE_MANAGED_IDENTITY_NAME}" in missing
    (wrong,) = workflow.check(s, ml_client=fake, arm_get=_arm(client_id="abcdef00-0000-0000-0000-000000000000"))
    assert "set AZURE_MANAGED_IDENTITY_CLIENT_ID=abcdef00-0000-0000-0000-000000000000" in wrong


def test_quota_shortfall_names_the_vm_family_to_request(tmp_path: Path) -> None:
    fake = FakeMLClient(workspace=_workspace(), **_sizes_and_usage(a100_limit=0))
    (problem,) = workflow.check(azure_settings(tmp_path), ml_client=fake, arm_get=_arm())
    assert "standardNCADSA100v4Family needs 24 vCPUs" in problem and "0 of 0 are free" in problem
    assert "request more for standardNCADSA100v4Family" in problem
    # Two deployment instances reserve ceil(2 * 1.2) = 3 instances of 8 vCPUs; 92 are free.
    ok = FakeMLClient(workspace=_workspace(), **_sizes_and_usage())
    two = azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_COUNT=2)
    assert workflow.check(two, ml_client=ok, arm_get=_arm()) == []
    tight = FakeMLClient(workspace=_workspace(), **_sizes_and_usage(e_limit=19))
    (problem,) = workflow.check(
        azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_COUNT=2), ml_client=tight, arm_get=_arm()
    )
    assert "standardESv3Family needs 24 vCPUs" in problem and "11 of 19 are free" in problem


def test_unreadable_usage_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    fake = FakeMLClient(workspace=_workspace(), **_sizes_and_usage())
    fake.errors["compute.list_usage"] = HttpResponseError(message="(AuthorizationFailed) no read access")
    (problem,) = workflow.check(azure_settings(tmp_path), ml_client=fake, arm_get=_arm())
    assert problem.startswith("quota: cannot read VM sizes and usage") and "AuthorizationFailed" in problem


def test_a_credential_that_hangs_is_reported_after_the_timeout() -> None:
    asked, release, returned = threading.Event(), threading.Event(), threading.Event()

    class Hanging:
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            asked.set()
            release.wait(30)  # what a credential waiting on an unreachable host looks like
            returned.set()
            raise AssertionError("released")  # a probe that waited for this re-raises it: the test fails

    try:
        problem = client.probe_credential(Hanging(), timeout=0.2)
        # The probe answered while the credential was still stuck in get_token: it gave up on its
        # timeout instead of waiting for the credential (which only returns once the test releases it).
        stuck = not returned.is_set()
    finally:
        release.set()
    assert stuck and asked.wait(30)  # and it had really asked for a token
    assert problem is not None and problem.startswith("no Azure token within 0.2 s") and "az login" in problem


def test_an_unexpected_credential_error_is_not_disguised_as_a_login_problem() -> None:
    class Broken:
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise ValueError("bad tenant id format")

    with pytest.raises(ValueError, match="bad tenant id format"):
        client.probe_credential(Broken())


def test_model_fit_refuses_small_vms_names_a_size_that_fits_and_only_warns_for_unknowns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_phi import common

    # Phi-3-mini in fp32 is 14.2 GiB; about twice that at peak plus the server: ~30 GiB.
    assert 29 < preflight.memory_need_gib(preflight.MODEL_PARAMS["microsoft/phi-3-mini-4k-instruct"]) < 32
    (small,) = preflight.fit_problems(azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_TYPE="standard_e4s_v3"))
    assert small.startswith("AZURE_DEPLOYMENT_INSTANCE_TYPE=standard_e4s_v3 has 32 GiB of RAM")
    assert small.endswith("set AZURE_DEPLOYMENT_INSTANCE_TYPE=Standard_E8s_v3 or larger")
    for fits in (config.Settings.AZURE_DEPLOYMENT_INSTANCE_TYPE, "Standard_NC24ads_A100_v4", "Standard_E16s_v3"):
        assert preflight.fit_problems(azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_TYPE=fits)) == []
    assert preflight.fit_problems(azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_TYPE="Standard_DS3_v2",
                                                 BASE_MODEL="tiny")) == []  # fmt: skip
    with caplog.at_level("WARNING"):
        assert preflight.fit_problems(azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_TYPE="Standard_X9")) == []
        assert preflight.fit_problems(azure_settings(tmp_path, BASE_MODEL="someone/unknown-7b")) == []
    assert "Standard_X9 is not in the table" in caplog.text and "size of someone/unknown-7b is not known" in caplog.text
    # A catalog job fine-tunes Phi-3-mini whatever BASE_MODEL says.
    catalog = azure_settings(tmp_path, BASE_MODEL="tiny", AZURE_DEPLOYMENT_INSTANCE_TYPE="Standard_DS3_v2")
    common.update_state(catalog, "training", {"backend": "azure", "job_name": "j", "mode": "catalog"})
    (problem,) = preflight.fit_problems(catalog)
    assert "serving microsoft/phi-3-mini-4k-instruct" in problem
