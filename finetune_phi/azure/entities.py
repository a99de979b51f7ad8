"""Every Azure ML entity this project creates, each defined once from the settings.

The real calls (workflow.py), the `--dry-run` YAML and the tests all build their entities here, so
what a dry-run shows is what a real run sends. No function here touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import config
from finetune_phi import common
from finetune_phi.training import FINETUNING_DIR, fine_tune_command

if TYPE_CHECKING:  # the SDK takes ~3 s to import: only the functions that build entities pay for it
    from azure.ai.ml.entities import (
        AmlCompute,
        Command,
        Environment,
        ManagedOnlineDeployment,
        ManagedOnlineEndpoint,
        Model,
    )

# Azure ML base images (https://github.com/Azure/AzureML-Containers). The GPU image brings the CUDA
# user-space libraries and OpenMPI for multi-node runs; torch's PyPI wheel carries its own CUDA runtime.
GPU_BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest"
CPU_BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-ubuntu24.04:latest"
CONDA_FILE = config.ROOT / "conda.yml"

# Named job outputs the deploy step registers the model from.
COMMAND_OUTPUT = "model_output"  # our fine_tune.py writes the MLflow model here
CATALOG_OUTPUT = "registered_model"  # what azure.ai.ml.finetuning names its output (both catalog modes)
DATA_USES = ("train", "validation")  # the data assets of a catalog fine-tune

# Used by the deploy dry-run when no training job has been recorded yet.
PLACEHOLDER_JOB_NAME = "your-training-job-name"

# Loading Phi-3-mini (7.6 GB of weights) on a fresh instance takes minutes; the default 10 s probe
# delay would restart the container before the model is ever ready.
PROBE_INITIAL_DELAY_S = 600
# The tutorial's 180 s, the managed endpoint's maximum per request: generation on CPU is slow.
REQUEST_TIMEOUT_MS = 180_000

ENDPOINT_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,30}[a-zA-Z0-9]$")


def is_gpu_size(vm_size: str) -> bool:
    """Azure's N-series (NC, ND, NV) are the GPU sizes."""
    return vm_size.lower().startswith("standard_n")


def base_image(settings: config.Settings) -> str:
    return GPU_BASE_IMAGE if is_gpu_size(settings.AZURE_COMPUTE_SIZE) else CPU_BASE_IMAGE


# --- training ------------------------------------------------------------------------------------


def compute(settings: config.Settings) -> "AmlCompute":
    from azure.ai.ml.entities import AmlCompute

    return AmlCompute(
        name=settings.AZURE_COMPUTE_NAME,
        size=settings.AZURE_COMPUTE_SIZE,
        tier="Dedicated",
        min_instances=settings.AZURE_COMPUTE_MIN_INSTANCES,
        max_instances=settings.AZURE_COMPUTE_MAX_INSTANCES,
        idle_time_before_scale_down=settings.AZURE_COMPUTE_IDLE_SECONDS,
    )


def environment_version(settings: config.Settings) -> str:
    """A version derived from the image and conda.yml: re-running registers nothing new, a change does."""
    if not CONDA_FILE.is_file():
        raise FileNotFoundError(f"{CONDA_FILE} is missing: it defines the Azure training environment")
    digest = hashlib.sha256(base_image(settings).encode() + b"\0" + CONDA_FILE.read_bytes()).hexdigest()
    return digest[:12]


def environment(settings: config.Settings) -> "Environment":
    from azure.ai.ml.entities import Environment

    return Environment(
        name=settings.AZURE_ENVIRONMENT_NAME,
        version=environment_version(settings),
        image=base_image(settings),
        conda_file=str(CONDA_FILE),
        description="finetune-phi training: TRL SFT of Phi-3 (conda.yml pins mirror pyproject.toml)",
    )


def environment_ref(settings: config.Settings) -> str:
    return f"azureml:{settings.AZURE_ENVIRONMENT_NAME}:{environment_version(settings)}"


def training_env_vars() -> dict[str, str]:
    """Quiet, unbuffered runs; the hub stays reachable because the job downloads Phi-3 from it."""
    return {
        "PYTHONUNBUFFERED": "1",  # log lines reach `jobs.stream` as they happen
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
    }


def training_job(settings: config.Settings) -> "Command":
    """Our fine_tune.py as a command job, with the exact command line the local backend runs.

    The `command()` builder itself is what `jobs.create_or_update` takes: the CommandJob it builds
    (`_to_job()`) is refused with "Non supported job type". Its YAML, though, is written from that
    CommandJob (see to_yaml_dict), because the builder's own YAML does not load back with load_job.
    """
    from azure.ai.ml import Input, Output, PyTorchDistribution, command

    distributed = settings.AZURE_JOB_PROCESSES_PER_NODE > 1 or settings.AZURE_JOB_INSTANCE_COUNT > 1
    builder = command(
        code=str(FINETUNING_DIR),
        command=fine_tune_command(
            settings,
            train_file="${{inputs.train_file}}",
            eval_file="${{inputs.eval_file}}",
            model_output_dir="${{outputs.%s}}" % COMMAND_OUTPUT,
            model=settings.BASE_MODEL,
        ),
        inputs={
            "train_file": Input(type="uri_file", path=str(settings.train_data_path)),
            "eval_file": Input(type="uri_file", path=str(settings.test_data_path)),
        },
        # A real output (the tutorial passed an input string): Azure ML mounts a writable folder and
        # keeps it as azureml://jobs/<job>/outputs/model_output for the deploy step.
        outputs={COMMAND_OUTPUT: Output(type="mlflow_model")},
        environment=environment_ref(settings),
        compute=settings.AZURE_COMPUTE_NAME,
        instance_count=settings.AZURE_JOB_INSTANCE_COUNT,
        distribution=(
            PyTorchDistribution(process_count_per_instance=settings.AZURE_JOB_PROCESSES_PER_NODE)
            if distributed
            else None
        ),
        environment_variables=training_env_vars(),
        experiment_name=settings.AZURE_EXPERIMENT_NAME,
        display_name=settings.AZURE_JOB_DISPLAY_NAME,
    )
    return builder


def _number(value: float) -> str:
    """A whole number as Azure's own fine-tuning samples write it ("1", not "1.0"); others as they are."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def catalog_hyperparameters(settings: config.Settings) -> dict[str, str]:
    # The catalog's fine-tuning component takes every value as a string.
    return {
        "num_train_epochs": _number(settings.NUM_TRAIN_EPOCHS),
        "learning_rate": repr(settings.LEARNING_RATE),
        "per_device_train_batch_size": str(settings.PER_DEVICE_TRAIN_BATCH_SIZE),
        "gradient_accumulation_steps": str(settings.GRADIENT_ACCUMULATION_STEPS),
    }


def catalog_model_id(settings: config.Settings, version: str | None = None) -> str:
    """AZURE_CATALOG_MODEL in AZURE_CATALOG_REGISTRY: a version's id, or its latest label."""
    base = f"azureml://registries/{settings.AZURE_CATALOG_REGISTRY}/models/{settings.AZURE_CATALOG_MODEL}"
    return f"{base}/versions/{version}" if version else f"{base}/labels/latest"


def data_path(settings: config.Settings, use: str) -> Path:
    return settings.train_data_path if use == "train" else settings.test_data_path


def data_asset(settings: config.Settings, use: str) -> Any:
    """A data file as a `uri_file` asset, as Azure's serverless fine-tuning takes it.

    Its version is derived from the content: a second run with the same file registers nothing new."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Data

    path = data_path(settings, use)
    return Data(
        name=f"{settings.AZURE_EXPERIMENT_NAME}-{use}",
        version=hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "1",
        path=str(path),
        type=AssetTypes.URI_FILE,
        description=f"finetune-phi {use} split ({path.name})",
    )


def catalog_job(
    settings: config.Settings, model_id: str | None = None, *, serverless: bool = False,
    training_data: str | None = None, validation_data: str | None = None,
) -> Any:
    """Azure's own fine-tuning of a catalog model (chat completion) on our data.

    `serverless`: fine-tuning as a service, billed per token, with no compute; else on our cluster
    (the catalog's managed-compute fine-tuning). `model_id` is the registry version the lifecycle
    check read (default: the latest label, for a dry run); the data are asset ids, or local files.
    """
    from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

    return create_finetuning_job(
        model=model_id or catalog_model_id(settings),
        task=FineTuningTaskType.CHAT_COMPLETION,
        training_data=training_data or str(settings.train_data_path),
        validation_data=validation_data or str(settings.test_data_path),
        hyperparameters=catalog_hyperparameters(settings),
        output_model_name_prefix=settings.AZURE_MODEL_NAME,
        compute=None if serverless else settings.AZURE_COMPUTE_NAME,
        experiment_name=settings.AZURE_EXPERIMENT_NAME,
        display_name=settings.AZURE_JOB_DISPLAY_NAME,
    )


# --- deployment ----------------------------------------------------------------------------------


def model_path(job_name: str, output: str = COMMAND_OUTPUT) -> str:
    return f"azureml://jobs/{job_name}/outputs/{output}"


def model(settings: config.Settings, job_name: str, output: str = COMMAND_OUTPUT) -> "Model":
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    return Model(
        name=settings.AZURE_MODEL_NAME,
        path=model_path(job_name, output),
        type=AssetTypes.MLFLOW_MODEL,
        description=f"Phi-3 fine-tuned by job {job_name}",
        tags={"job_name": job_name},
    )


def workspace_model_id(region: str, workspace_id: str, name: str, version: str) -> str:
    """A workspace model as a serverless endpoint names it (Azure's fine-tuning samples)."""
    return f"azureml://locations/{region}/workspaces/{workspace_id}/models/{name}/versions/{version}"


PLACEHOLDER_REGION = "<workspace-region>"
PLACEHOLDER_WORKSPACE_ID = "<workspace-id>"


def serverless_endpoint(settings: config.Settings, model_id: str, location: str | None = None) -> Any:
    """The serverless endpoint of a model fine-tuned as a service: pay per token, no VM, key auth.

    `location`: the workspace's region (without it the SDK reads the workspace once more)."""
    from azure.ai.ml.entities import ServerlessEndpoint

    return ServerlessEndpoint(
        name=settings.AZURE_ENDPOINT_NAME,
        model_id=model_id,
        location=location,
        description=f"finetune-phi: {settings.AZURE_CATALOG_MODEL} fine-tuned as a service",
        auth_mode="key",
    )


def endpoint(settings: config.Settings) -> "ManagedOnlineEndpoint":
    from azure.ai.ml.entities import IdentityConfiguration, ManagedIdentityConfiguration, ManagedOnlineEndpoint

    return ManagedOnlineEndpoint(
        name=settings.AZURE_ENDPOINT_NAME,
        description="finetune-phi: fine-tuned Phi-3 chat model",
        auth_mode="key",
        identity=IdentityConfiguration(
            type="user_assigned",
            user_assigned_identities=[
                ManagedIdentityConfiguration(
                    resource_id=settings.AZURE_MANAGED_IDENTITY_RESOURCE_ID,
                    client_id=settings.AZURE_MANAGED_IDENTITY_CLIENT_ID,
                )
            ],
        ),
    )


def deployment_env_vars(settings: config.Settings) -> dict[str, str]:
    return {
        # The tutorial's variables, for scoring code that looks up workspace resources.
        "SUBSCRIPTION_ID": settings.AZURE_SUBSCRIPTION_ID,
        "RESOURCE_GROUP_NAME": settings.AZURE_RESOURCE_GROUP_NAME,
        "UAI_CLIENT_ID": settings.AZURE_MANAGED_IDENTITY_CLIENT_ID,
        # With a user-assigned identity only, azure-identity inside the container must be told which one.
        "AZURE_CLIENT_ID": settings.AZURE_MANAGED_IDENTITY_CLIENT_ID,
        # azureml-inference-server-http starts one worker per WORKER_COUNT, each with its own model copy.
        "WORKER_COUNT": "1",
    }


def deployment(settings: config.Settings, model_ref: str) -> "ManagedOnlineDeployment":
    from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

    def probe() -> ProbeSettings:
        return ProbeSettings(
            initial_delay=PROBE_INITIAL_DELAY_S, period=30, timeout=10, failure_threshold=30, success_threshold=1
        )

    return ManagedOnlineDeployment(
        name=settings.AZURE_DEPLOYMENT_NAME,
        endpoint_name=settings.AZURE_ENDPOINT_NAME,
        model=model_ref,  # an MLflow model: Azure ML builds the scoring environment and script itself
        instance_type=settings.AZURE_DEPLOYMENT_INSTANCE_TYPE,
        instance_count=settings.AZURE_DEPLOYMENT_INSTANCE_COUNT,
        environment_variables=deployment_env_vars(settings),
        request_settings=OnlineRequestSettings(
            request_timeout_ms=REQUEST_TIMEOUT_MS,
            max_concurrent_requests_per_instance=settings.AZURE_DEPLOYMENT_MAX_CONCURRENT_REQUESTS,
            # No max_queue_wait_ms (the tutorial sends 120 s): Azure deprecated it for managed online
            # endpoints; a queued request's wait now counts against request_timeout_ms.
        ),
        liveness_probe=probe(),
        readiness_probe=probe(),
    )


# --- YAML for `--dry-run` and `az ml ... create -f` ----------------------------------------------

_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")


def _local_path(value: str) -> str | None:
    """The local path inside an `azureml:<local path>` reference the SDK writes, else None."""
    if not value.startswith("azureml:") or value.startswith("azureml://"):
        return None
    rest = value[len("azureml:") :]
    if rest.startswith(("/", "./", "../")) or _WINDOWS_ABS.match(rest):
        return rest
    return None  # azureml:name:version / name@latest: a registered asset, keep it


def _clean(value: Any, yaml_dir: Path) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if item is None:  # dumped nulls fail the schema on load
                continue
            if key in ("path", "code") and isinstance(item, str):
                local = _local_path(item)
                if local is not None or (key == "code" and not item.startswith("azureml:")):
                    # Absolute, so that `az ml ... create -f` finds it from any working directory.
                    item = str((yaml_dir / (local if local is not None else item)).resolve())
            out[key] = _clean(item, yaml_dir)
        return out
    if isinstance(value, list):
        return [_clean(item, yaml_dir) for item in value if item is not None]
    return value


def to_yaml_dict(entity: Any, yaml_dir: Path) -> dict[str, Any]:
    """The entity as the dict `load_*` / `az ml ... create -f` accept, for a YAML file in `yaml_dir`."""
    # Serializing an endpoint with an identity rewrites the identity in place: work on a copy.
    if hasattr(entity, "_to_job"):  # a command() builder: its own YAML does not load back, its job's does
        entity = entity._to_job()  # (and it cannot be deep-copied; the job it builds is a new object)
    if not hasattr(entity, "_to_dict"):  # a ServerlessEndpoint: its as_dict() needs a service's system_data
        keys = ("name", "model_id", "description", "auth_mode", "location", "tags")
        return _clean({k: getattr(entity, k, None) for k in keys}, Path(yaml_dir))
    raw = copy.deepcopy(entity)._to_dict()
    return _clean(raw, Path(yaml_dir))


def write_yaml(entity: Any, path: Path) -> Path:
    import yaml

    path = Path(path)
    data = to_yaml_dict(entity, path.parent)
    common.atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return path
