"""finetune-phi configuration: the one file you edit.

Every field below can be overridden by an environment variable of the same name, or by a
line ``NAME=value`` in a ``.env`` file at the repository root (see ``.env.example``).
Precedence: environment > ``.env`` > the defaults written here.

Secrets (``AZURE_ML_API_KEY``, subscription ids) belong in the environment or ``.env``
(which git ignores), never in this file.

    python -c "import config; print(config.load())"     # show the effective settings

Every setting is also a module attribute, as in the tutorial this project follows
(``from config import AZURE_ML_ENDPOINT, AZURE_ML_API_KEY``): each access returns
``load()``'s value at that moment. Change a default in ``Settings`` below, not by assigning
the name at module level: ``load()`` refuses such a line and says where the value goes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping, get_type_hints

ROOT = Path(__file__).resolve().parent

# A value still equal to one of these markers was never filled in.
PLACEHOLDER_PREFIX = "<your-"

BACKENDS = ("local", "azure")
# What serves the model, and so which request shape the flows send (chat_flow/endpoint_client.py):
# "local" = finetune_phi.endpoint; "azure-mlflow" = Azure's no-code deployment of our MLflow model;
# "azure-catalog" = a model-catalog fine-tuned model on a managed online endpoint;
# "azure-serverless" = a serverless endpoint (fine-tuning as a service): OpenAI chat completions.
ENDPOINT_KINDS = ("local", "azure-mlflow", "azure-catalog", "azure-serverless")
# The conversation encodings of the supported model families (finetuning_dir/chat_format.TURN_FORMATS).
CHAT_FORMATS = ("phi3", "phi4-mini")
ENDPOINT_DTYPES = ("auto", "float32", "bfloat16", "float16")  # finetune_phi.endpoint.loading.DTYPES
# The scores fine_tune.py logs that the deploy gate can use as its primary metric (higher is better).
EVAL_GATE_METRICS = ("f1", "rougeL", "exact_match", "contains")


# Never shown whole: not by repr/str of the settings, not in a log line or an error message.
SECRET_FIELDS = ("AZURE_ML_API_KEY", "EVAL_JUDGE_API_KEY")

IDENTITY_RESOURCE_ID_PARTS = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP_NAME", "AZURE_MANAGED_IDENTITY_NAME")
IDENTITY_RESOURCE_ID_FORMAT = (
    "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
)


def redact(secret: str) -> str:
    """Enough of a secret to tell two apart in a log, never enough to use it."""
    if not secret:
        return "<empty>"
    return f"{secret[:4]}…({len(secret)} chars)" if len(secret) >= 16 else "<redacted>"


@dataclass(frozen=True, repr=False)
class Settings:
    # --- which backend runs the pipeline -------------------------------------------------
    # "local": everything on this machine, offline (MLflow sqlite store, local endpoint).
    # "azure": Azure ML compute, jobs, registry and managed online endpoints.
    BACKEND: str = "local"

    # --- Azure workspace (only the azure backend reads these) ----------------------------
    AZURE_SUBSCRIPTION_ID: str = "<your-subscription-id>"
    AZURE_RESOURCE_GROUP_NAME: str = "<your-resource-group>"
    AZURE_ML_WORKSPACE_NAME: str = "<your-workspace>"
    # The user-assigned managed identity the online endpoint runs as (needs AcrPull and
    # Storage Blob Data Reader on the workspace's registry and storage).
    AZURE_MANAGED_IDENTITY_CLIENT_ID: str = "<your-managed-identity-client-id>"
    AZURE_MANAGED_IDENTITY_NAME: str = "<your-managed-identity-name>"
    # Empty: built from the three values above, as the tutorial builds it. Set it only for an identity
    # in another subscription or resource group than the workspace's.
    AZURE_MANAGED_IDENTITY_RESOURCE_ID: str = ""
    # "default" = DefaultAzureCredential; "cli" = AzureCliCredential (after `az login`).
    AZURE_CREDENTIAL: str = "default"
    # The Azure cloud the workspace lives in, as azure-ai-ml names it: AzureCloud (public),
    # AzureChinaCloud or AzureUSGovernment. Every Resource Manager call goes to that cloud's URL.
    AZURE_CLOUD: str = "AzureCloud"

    # --- Azure compute and training job ---------------------------------------------------
    AZURE_COMPUTE_NAME: str = "gpu-a100-cluster"
    # GPU default; use Standard_E16s_v3 for a CPU-only cluster.
    AZURE_COMPUTE_SIZE: str = "Standard_NC24ads_A100_v4"
    AZURE_COMPUTE_MIN_INSTANCES: int = 0
    AZURE_COMPUTE_MAX_INSTANCES: int = 1
    # An idle node bills until it scales down: the tutorial's 120 s, not the SDK's 30 min.
    AZURE_COMPUTE_IDLE_SECONDS: int = 120
    AZURE_JOB_INSTANCE_COUNT: int = 1  # nodes
    AZURE_JOB_PROCESSES_PER_NODE: int = 1  # GPUs used per node
    AZURE_EXPERIMENT_NAME: str = "finetune-phi3"
    AZURE_JOB_DISPLAY_NAME: str = "finetune-phi3-mini"
    AZURE_ENVIRONMENT_NAME: str = "finetune-phi3-env"

    # --- Azure model catalog (setup_ml.py --mode serverless, --mode catalog) ---------------------
    # The catalog model Azure fine-tunes, by its name in AZURE_CATALOG_REGISTRY. Azure retired Phi-3 and
    # Phi-3.5 from catalog fine-tuning and inference: Phi-4-mini-instruct is their replacement. Each run
    # reads the model's retirement dates and regions from the registry before anything is billed.
    AZURE_CATALOG_MODEL: str = "Phi-4-mini-instruct"
    AZURE_CATALOG_REGISTRY: str = "azureml"

    # --- model, endpoint, deployment --------------------------------------------------------
    AZURE_MODEL_NAME: str = "finetune-phi3-model"
    # Endpoint names are unique per Azure region: change it before a real Azure run.
    AZURE_ENDPOINT_NAME: str = "finetune-phi3-endpoint"
    AZURE_DEPLOYMENT_NAME: str = "finetune-phi3-deployment"
    # 64 GiB: Azure's no-code MLflow scoring loads the fine-tuned Phi-3-mini (3.8B parameters) in fp32
    # on CPU, ~14 GiB of weights and about twice that at peak; the tutorial's Standard_E4s_v3 (32 GiB)
    # cannot hold it. `deploy_model.py --backend azure --check` checks any size against the model.
    AZURE_DEPLOYMENT_INSTANCE_TYPE: str = "Standard_E8s_v3"
    AZURE_DEPLOYMENT_INSTANCE_COUNT: int = 1
    # Requests Azure lets into one instance at once (the tutorial: 3). Azure's MLflow scoring runs one
    # worker with one model copy (WORKER_COUNT=1), which generates for one request at a time: the
    # others wait inside the container, on the same 180 s request timeout, instead of being told 429.
    AZURE_DEPLOYMENT_MAX_CONCURRENT_REQUESTS: int = 1
    # Written by deploy_model.py into ENV_FILE; the flows read them from there.
    AZURE_ML_ENDPOINT: str = ""
    AZURE_ML_API_KEY: str = ""
    # One of ENDPOINT_KINDS, also written by deploy_model.py. Empty (an .env written by hand, the
    # tutorial's way): the flows tell the kind from the URL where it can (chat_flow/endpoint_client.py).
    AZURE_ML_ENDPOINT_KIND: str = ""
    # The deployed model's family (one of CHAT_FORMATS), also written by deploy_model.py: how a client
    # writes a conversation as the one prompt our MLflow model takes.
    AZURE_ML_CHAT_FORMAT: str = "phi3"

    # --- data ---------------------------------------------------------------------------------
    DATASET_NAME: str = "HuggingFaceH4/ultrachat_200k"
    DATASET_SPLIT: str = "train_sft"
    DATASET_PERCENT: float = 1.0  # percent of the split to take (the tutorial's 1%)
    TEST_SIZE: float = 0.2
    SEED: int = 42
    TRAIN_DATA_PATH: str = "data/train_data.jsonl"
    TEST_DATA_PATH: str = "data/test_data.jsonl"

    # --- fine-tuning ----------------------------------------------------------------------------
    # "tiny" builds a 1M-parameter Phi-3-architecture model offline (the local default);
    # a hub id or a local directory loads real weights: microsoft/Phi-3-mini-4k-instruct,
    # microsoft/Phi-3.5-mini-instruct or microsoft/Phi-4-mini-instruct.
    BASE_MODEL: str = "microsoft/Phi-3-mini-4k-instruct"
    LOCAL_BASE_MODEL: str = "tiny"  # what the local backend trains unless BASE_MODEL is forced
    PEFT: str = "auto"  # "lora", "full", or "auto" (lora for real models, full for tiny)
    NUM_TRAIN_EPOCHS: float = 1.0
    MAX_STEPS: int = -1  # > 0 overrides epochs
    LEARNING_RATE: float = 5e-5
    WARMUP_RATIO: float = 0.03  # of the training steps, then a cosine decay
    # Learn only from the assistant's turns (and their <|end|>), not from the user's text.
    ASSISTANT_ONLY_LOSS: bool = True
    PER_DEVICE_TRAIN_BATCH_SIZE: int = 4
    GRADIENT_ACCUMULATION_STEPS: int = 1
    MAX_SEQ_LENGTH: int = 1024
    LORA_R: int = 16
    LORA_ALPHA: int = 32
    LORA_DROPOUT: float = 0.05
    # > 0: checkpoint every N optimizer steps; a killed local run resumes when setup_ml.py is run
    # again (checkpoints in STATE_DIR/checkpoints, removed once the run finishes). 0 = none.
    SAVE_STEPS: int = 0

    # --- evaluation (finetuning_dir/evaluation.py, the gate in deploy_model.py, eval_flow/) --------
    # After training, the first EVAL_MAX_ROWS questions of the test split are answered greedily by the
    # base and the fine-tuned model (two passes, batched) and scored; 0 skips it. Each answer stops at
    # EVAL_MAX_NEW_TOKENS: one that reaches it counts as "did not stop".
    EVAL_MAX_ROWS: int = 50
    EVAL_MAX_NEW_TOKENS: int = 256
    EVAL_BATCH_SIZE: int = 16  # questions answered together (GPU memory: KV cache of prompt + answer)
    # deploy_model.py refuses a model whose EVAL_PRIMARY_METRIC (f1, rougeL, exact_match or contains)
    # is more than EVAL_GATE_MARGIN below the base model's (same run) or the deployed model's, or whose
    # stop rate is lower than either; --force deploys it anyway (and records that it was forced).
    EVAL_PRIMARY_METRIC: str = "f1"
    EVAL_GATE_MARGIN: float = 0.02
    # An OpenAI-compatible judge for eval_flow/ (relevance, coherence, fluency, similarity through
    # azure-ai-evaluation). Empty = the flow scores offline only and says which scores it skipped.
    # Azure OpenAI: the resource URL (https://<name>.openai.azure.com) and the deployment name as model.
    EVAL_JUDGE_ENDPOINT: str = ""
    EVAL_JUDGE_API_KEY: str = ""  # secret: environment or .env only
    EVAL_JUDGE_MODEL: str = ""

    # --- local backend ---------------------------------------------------------------------------
    STATE_DIR: str = ".finetune_phi"  # local state: MLflow store, endpoint pid/log, Prompt flow home
    # Empty = sqlite store inside STATE_DIR.
    MLFLOW_TRACKING_URI: str = ""
    LOCAL_ENDPOINT_HOST: str = "127.0.0.1"
    LOCAL_ENDPOINT_PORT: int = 5001
    PROMPTFLOW_CONNECTION_NAME: str = "phi3_endpoint"
    # The local endpoint's limits. Azure's max_concurrent_requests_per_instance defaults to 1; ours
    # is 16 so that a full batch of running rows (the batcher's 16) can be in flight. Beyond it: 429
    # with Retry-After.
    ENDPOINT_MAX_CONCURRENT_REQUESTS: int = 16
    ENDPOINT_REQUEST_TIMEOUT_S: float = 90.0  # past it: 408 and the request's generation is abandoned
    ENDPOINT_MAX_BODY_BYTES: int = 1_048_576  # larger bodies: 413
    ENDPOINT_GRACEFUL_SHUTDOWN_S: float = 30.0  # SIGTERM lets requests in flight finish this long
    # Load policy (finetune_phi/endpoint/loading.py). dtype auto: bfloat16 on CUDA; on a CPU float32
    # unless it has native bf16 units (avx512_bf16/amx_bf16) and the weights were saved in 16 bits.
    ENDPOINT_DTYPE: str = "auto"  # auto, float32, bfloat16 or float16
    ENDPOINT_DEVICE: str = "auto"  # auto (CUDA if torch sees one), cpu, cuda or cuda:N
    # Prompt + new tokens per conversation; 0 = the model's own context (4096 for Phi-3-mini-4k). The
    # endpoint refuses to start when weights + the KV cache of ENDPOINT_MAX_CONCURRENT_REQUESTS such
    # contexts exceed free memory (or ENDPOINT_MEMORY_BUDGET_MB when > 0): lower one of them.
    ENDPOINT_MAX_CONTEXT_TOKENS: int = 0
    ENDPOINT_MEMORY_BUDGET_MB: int = 0
    # The batcher's caps (finetune_phi/endpoint/batcher.py): prompt + new tokens that all running rows
    # hold in KV cache at once (a bigger request is split across steps, not refused), and tokens of
    # one packed forward (longer prefills are fed in chunks). The memory check counts the first.
    ENDPOINT_MAX_BATCH_TOKENS: int = 16384
    ENDPOINT_MAX_STEP_TOKENS: int = 1024
    # The .env file read here and written by deploy_model.py. Only the environment can move it
    # (a .env cannot name itself); tests point it at a temp file so a user's .env is never touched.
    ENV_FILE: str = ".env"

    def __post_init__(self) -> None:
        if not self.AZURE_MANAGED_IDENTITY_RESOURCE_ID.strip():
            derived = IDENTITY_RESOURCE_ID_FORMAT.format(
                sub=self.AZURE_SUBSCRIPTION_ID, rg=self.AZURE_RESOURCE_GROUP_NAME, name=self.AZURE_MANAGED_IDENTITY_NAME
            )
            object.__setattr__(self, "AZURE_MANAGED_IDENTITY_RESOURCE_ID", derived)

    def __repr__(self) -> str:
        shown = (f"{f.name}={redact(v) if f.name in SECRET_FIELDS and v else v!r}"
                 for f in fields(self) for v in [getattr(self, f.name)])  # fmt: skip
        return f"Settings({', '.join(shown)})"

    # -- derived values ----------------------------------------------------------------------------
    @property
    def env_file(self) -> Path:
        return _resolve(self.ENV_FILE)

    @property
    def state_dir(self) -> Path:
        return _resolve(self.STATE_DIR)

    @property
    def tracking_uri(self) -> str:
        if self.MLFLOW_TRACKING_URI:
            return self.MLFLOW_TRACKING_URI
        return f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def train_data_path(self) -> Path:
        return _resolve(self.TRAIN_DATA_PATH)

    @property
    def test_data_path(self) -> Path:
        return _resolve(self.TEST_DATA_PATH)

    def with_overrides(self, **values: object) -> "Settings":
        if "AZURE_MANAGED_IDENTITY_RESOURCE_ID" not in values and self._identity_derived():
            values["AZURE_MANAGED_IDENTITY_RESOURCE_ID"] = ""  # still derived from the (new) parts
        return dataclasses.replace(self, **values)

    def _identity_derived(self) -> bool:
        return self.AZURE_MANAGED_IDENTITY_RESOURCE_ID == IDENTITY_RESOURCE_ID_FORMAT.format(
            sub=self.AZURE_SUBSCRIPTION_ID, rg=self.AZURE_RESOURCE_GROUP_NAME, name=self.AZURE_MANAGED_IDENTITY_NAME
        )


class ConfigError(ValueError):
    """Raised with every configuration problem at once, each naming the variable to set."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "configuration problems:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nSet them in config.py, in .env, or as environment variables (see .env.example)."
        )


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a .env file with python-dotenv (quotes, comments and `export` handled)."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _cast(name: str, raw: str, typ: type, problems: list[str]) -> object:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return typ(raw.strip()) if typ in (int, float) else raw
    except ValueError:
        problems.append(f"{name}={raw!r} is not a valid {typ.__name__}; set {name} to a {typ.__name__}")
        return None


def load(
    env: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
    **overrides: object,
) -> Settings:
    """The effective settings: defaults < .env < environment < explicit overrides.

    Type errors in overrides are all collected and raised together as ConfigError.
    """
    env = os.environ if env is None else env
    if dotenv_path is None:
        dotenv_path = _resolve(env.get("ENV_FILE", Settings.ENV_FILE))
    dotenv = read_dotenv(dotenv_path)
    hints = get_type_hints(Settings)
    values: dict[str, object] = {}
    problems: list[str] = []
    for f in fields(Settings):
        raw = env.get(f.name) if f.name == "ENV_FILE" else env.get(f.name, dotenv.get(f.name))
        if raw is not None:
            value = _cast(f.name, raw, hints[f.name], problems)
            if value is not None:
                values[f.name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    problems += _check_values(settings) + _shadowed_settings()
    if problems:
        raise ConfigError(problems)
    return settings


def _shadowed_settings() -> list[str]:
    """A setting assigned at module level (the tutorial's style, pasted into this file).

    `from config import NAME` would then get the pasted value (a global wins over __getattr__ below)
    while load(), which every script uses, still returns the dataclass default: two values for one name.
    """
    return [
        f"{name} is assigned at module level in config.py; settings live in the Settings dataclass: "
        f"change its default there, or set {name} in .env or the environment, and delete that line"
        for name in _SETTING_NAMES
        if name in globals()
    ]


def _check_values(s: Settings) -> list[str]:
    """Checks every backend needs (ranges and enumerations)."""
    problems = []
    if s.BACKEND not in BACKENDS:
        problems.append(f"BACKEND={s.BACKEND!r}: use one of {', '.join(BACKENDS)}")
    if not 0 < s.DATASET_PERCENT <= 100:
        problems.append(f"DATASET_PERCENT={s.DATASET_PERCENT}: use a percentage in (0, 100]")
    if not 0 < s.TEST_SIZE < 1:
        problems.append(f"TEST_SIZE={s.TEST_SIZE}: use a fraction in (0, 1), e.g. 0.2")
    if s.EVAL_MAX_ROWS < 0:
        problems.append(f"EVAL_MAX_ROWS={s.EVAL_MAX_ROWS}: use 0 (no evaluation) or a positive row count")
    if s.EVAL_MAX_NEW_TOKENS <= 0:
        problems.append(f"EVAL_MAX_NEW_TOKENS={s.EVAL_MAX_NEW_TOKENS}: use a positive token count")
    if s.EVAL_BATCH_SIZE <= 0:
        problems.append(f"EVAL_BATCH_SIZE={s.EVAL_BATCH_SIZE}: use a positive batch size")
    if s.EVAL_PRIMARY_METRIC not in EVAL_GATE_METRICS:
        problems.append(f"EVAL_PRIMARY_METRIC={s.EVAL_PRIMARY_METRIC!r}: use one of {', '.join(EVAL_GATE_METRICS)}")
    if not 0 <= s.EVAL_GATE_MARGIN <= 1:
        problems.append(f"EVAL_GATE_MARGIN={s.EVAL_GATE_MARGIN}: use a score difference in [0, 1], e.g. 0.02")
    if not 0 <= s.WARMUP_RATIO < 1:
        problems.append(f"WARMUP_RATIO={s.WARMUP_RATIO}: use a fraction of the training steps in [0, 1), e.g. 0.03")
    if s.PEFT not in ("auto", "lora", "full"):
        problems.append(f"PEFT={s.PEFT!r}: use auto, lora or full")
    if s.AZURE_ML_ENDPOINT_KIND and s.AZURE_ML_ENDPOINT_KIND not in ENDPOINT_KINDS:
        problems.append(f"AZURE_ML_ENDPOINT_KIND={s.AZURE_ML_ENDPOINT_KIND!r}: use one of {', '.join(ENDPOINT_KINDS)}")
    if s.AZURE_ML_CHAT_FORMAT not in CHAT_FORMATS:
        problems.append(f"AZURE_ML_CHAT_FORMAT={s.AZURE_ML_CHAT_FORMAT!r}: use one of {', '.join(CHAT_FORMATS)}")
    if s.AZURE_CREDENTIAL not in ("default", "cli"):
        problems.append(f"AZURE_CREDENTIAL={s.AZURE_CREDENTIAL!r}: use default or cli")
    for name in ("ENDPOINT_MAX_CONCURRENT_REQUESTS", "ENDPOINT_REQUEST_TIMEOUT_S", "ENDPOINT_MAX_BODY_BYTES"):
        if getattr(s, name) <= 0:
            problems.append(f"{name}={getattr(s, name)}: use a positive number")
    if s.ENDPOINT_DTYPE not in ENDPOINT_DTYPES:
        problems.append(f"ENDPOINT_DTYPE={s.ENDPOINT_DTYPE!r}: use one of {', '.join(ENDPOINT_DTYPES)}")
    device, _, index = s.ENDPOINT_DEVICE.partition(":")
    if s.ENDPOINT_DEVICE not in ("auto", "cpu", "cuda") and not (device == "cuda" and index.isdigit()):
        problems.append(f"ENDPOINT_DEVICE={s.ENDPOINT_DEVICE!r}: use auto, cpu, cuda or cuda:N")
    for name in ("ENDPOINT_MAX_BATCH_TOKENS", "ENDPOINT_MAX_STEP_TOKENS"):
        if getattr(s, name) <= 0:
            problems.append(f"{name}={getattr(s, name)}: use a positive number of tokens")
    for name in ("ENDPOINT_MAX_CONTEXT_TOKENS", "ENDPOINT_MEMORY_BUDGET_MB"):
        if getattr(s, name) < 0:
            problems.append(f"{name}={getattr(s, name)}: use 0 (no limit of its own) or a positive number")
    for name in ("LOCAL_ENDPOINT_PORT",):
        if not 0 < getattr(s, name) < 65536:
            problems.append(f"{name}={getattr(s, name)}: use a TCP port between 1 and 65535")
    return problems


# Published recipes `setup_ml.py --recipe NAME` trains instead of the settings above (they win over
# config.py, .env and the environment for the fields they name). "tutorial": the SDK tutorial's
# fine_tune.py (Microsoft Phi-3 Cookbook, "Fine-tune and Integrate custom Phi-3 models with Prompt
# flow"): full fine-tuning, lr 5e-6, 3 epochs, 2,048 tokens, 20% warmup, loss on every token,
# training seed 0, Phi-3.5-mini-instruct. README, "Differences from the tutorial", has the rest.
RECIPES: dict[str, dict[str, object]] = {
    "tutorial": {
        "BASE_MODEL": "microsoft/Phi-3.5-mini-instruct",
        "PEFT": "full",
        "LEARNING_RATE": 5e-6,
        "NUM_TRAIN_EPOCHS": 3.0,
        "PER_DEVICE_TRAIN_BATCH_SIZE": 4,
        "GRADIENT_ACCUMULATION_STEPS": 1,
        "MAX_SEQ_LENGTH": 2048,
        "WARMUP_RATIO": 0.2,
        "ASSISTANT_ONLY_LOSS": False,
        "SEED": 0,
    },
}


def with_recipe(settings: Settings, name: str) -> Settings:
    """`settings` with recipe `name`'s values; an unknown name is a ConfigError listing the known ones."""
    if name not in RECIPES:
        raise ConfigError([f"recipe {name!r}: use one of {', '.join(RECIPES)}"])
    return settings.with_overrides(**RECIPES[name])


# The Azure values each Azure step needs; the local backend needs none of them.
AZURE_WORKSPACE_FIELDS = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP_NAME", "AZURE_ML_WORKSPACE_NAME")
AZURE_IDENTITY_FIELDS = (
    "AZURE_MANAGED_IDENTITY_CLIENT_ID",
    "AZURE_MANAGED_IDENTITY_NAME",
    "AZURE_MANAGED_IDENTITY_RESOURCE_ID",
)


def missing(settings: Settings, names: Iterable[str]) -> list[str]:
    """Problems for each of `names` that is empty or still holds a placeholder."""
    problems = []
    for name in names:
        if name == "AZURE_MANAGED_IDENTITY_RESOURCE_ID" and settings._identity_derived():
            parts = missing(settings, IDENTITY_RESOURCE_ID_PARTS)
            if parts:
                problems.append(
                    f"AZURE_MANAGED_IDENTITY_RESOURCE_ID is built from {', '.join(IDENTITY_RESOURCE_ID_PARTS)}: set "
                    "those (or set AZURE_MANAGED_IDENTITY_RESOURCE_ID whole, for an identity in another group)"
                )
            continue
        value = str(getattr(settings, name))
        if not value.strip():
            problems.append(f"{name} is empty: set {name} in config.py, .env or the environment")
        elif PLACEHOLDER_PREFIX in value:
            problems.append(f"{name} still holds the placeholder {value!r}: set {name} to your own value")
    return problems


def validate(settings: Settings, names: Iterable[str]) -> None:
    """Raise ConfigError listing every one of `names` that is missing or a placeholder."""
    problems = missing(settings, names)
    if problems:
        raise ConfigError(problems)


# --- tutorial-style access: `import config; config.AZURE_ML_ENDPOINT` ---------------------------
# The tutorial's scripts import module-level constants (`from config import AZURE_SUBSCRIPTION_ID`).
# Here a setting is defined once, as a Settings field; PEP 562's module __getattr__ serves the
# same names from load(), so the value is the effective one (environment > .env > default) and a
# configuration load() rejects raises the same ConfigError, listing every problem, instead of
# handing one script a value that the others refuse.
_SETTING_NAMES = frozenset(f.name for f in fields(Settings))


def __getattr__(name: str) -> object:
    if name in _SETTING_NAMES:
        return getattr(load(), name)
    # AttributeError (not another error) keeps hasattr() and getattr(config, name, default) working.
    raise AttributeError(f"module 'config' has no attribute {name!r}{_close_matches(name)}")


def _close_matches(name: str) -> str:
    """The hint for an unknown name, in the message itself on Python 3.11.

    3.12+ formats its own "Did you mean" (from __dir__) everywhere a traceback is printed, logging
    included; 3.11 only in the interpreter's own display, so str(error) and logged tracebacks need ours.
    """
    if sys.version_info >= (3, 12):
        return ""
    public = {n for n in globals() if not n.startswith("_")}
    close = difflib.get_close_matches(name, sorted(_SETTING_NAMES | public), n=3, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {', '.join(close)}? (settings: the fields of config.Settings)"


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SETTING_NAMES)
