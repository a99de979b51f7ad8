"""What Azure still offers, checked before anything is created or billed: catalog models and VM sizes.

A catalog model's registry entry carries its lifecycle as tags (the `azureml` registry's
Phi-3-mini-4k-instruct: `FinetuneDeprecationDate: '2025-06-30'`, `FinetuneRetirementDate: '2025-08-30'`,
`InferenceRetirementDate: '2025-08-30'`) and, for fine-tuning as a service, the regions a fine-tuned
model can be deployed in (`maas-finetuning-deploy-regions`). Since mid-2026 the asset specs keep the
same facts as system metadata (`deprecation.finetuneRetirementDate: '2025-08-30T00:00:00.000000Z'`,
`maasFinetuning.maasFinetuningDeployRegions`): both spellings are read, from tags and properties. Azure refuses a job or a deployment of a
retired model only once it is submitted; the checks here say so first, with the date and what to use
instead. Retired VM sizes are a table: Azure publishes their retirement on Learn, not through an API.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import config
from finetune_phi.azure import entities

if TYPE_CHECKING:
    from azure.ai.ml import MLClient

log = logging.getLogger(__name__)

WARN_DAYS = 90  # a retirement this close is announced on every run

# The registry tags of each use: (deprecation tag, retirement tag). Looked up without regard to case,
# so the system metadata's camelCase names (finetuneRetirementDate, ...) are found too.
LIFECYCLE_TAGS = {
    "fine-tuning": ("FinetuneDeprecationDate", "FinetuneRetirementDate"),
    "inference": ("InferenceDeprecationDate", "InferenceRetirementDate"),
}
DEPLOY_REGIONS_TAG = "maas-finetuning-deploy-regions"
DEPLOY_REGIONS_KEYS = (DEPLOY_REGIONS_TAG, "maasFinetuningDeployRegions")

# Microsoft Learn's retired-models table names the successor of each retired family.
REPLACEMENTS = (
    (re.compile(r"^phi-3(\.5)?-", re.IGNORECASE), "Phi-4-mini-instruct"),
)

# GPU sizes Azure retired (learn.microsoft.com/azure/virtual-machines/sizes/retirement), with the size
# to use instead: the pattern, the series, the retirement date, the replacement for training and for serving.
RETIRED_SIZES = (
    (re.compile(r"^standard_nc(6|12|24|24r)s_v3$", re.IGNORECASE), "NCv3", "2025-09-30"),
    (re.compile(r"^standard_nc(6|12|24|24r)s_v2$", re.IGNORECASE), "NCv2", "2023-09-06"),
    (re.compile(r"^standard_nc(6|12|24|24r)$", re.IGNORECASE), "NC (v1)", "2023-09-06"),
    (re.compile(r"^standard_nd(6|12|24|24r)s$", re.IGNORECASE), "ND (v1)", "2023-09-06"),
    (re.compile(r"^standard_nv(6|12|24)$", re.IGNORECASE), "NV (v1)", "2023-09-06"),
)
SIZE_REPLACEMENT = {
    "AZURE_COMPUTE_SIZE": "Standard_NC24ads_A100_v4 (an A100, or Standard_E16s_v3 for a CPU cluster)",
    "AZURE_DEPLOYMENT_INSTANCE_TYPE": "Standard_NC4as_T4_v3 (a T4) or Standard_NC24ads_A100_v4 for a GPU, "
                                      "Standard_E8s_v3 for CPU",
}  # fmt: skip


def retired_size_problems(settings: config.Settings, names: Iterable[str]) -> list[str]:
    """Each of `names` (VM size settings) that holds a size Azure retired, with the size to use instead."""
    problems = []
    for name in names:
        size = str(getattr(settings, name))
        for pattern, series, date in RETIRED_SIZES:
            if pattern.match(size):
                problems.append(
                    f"{name}={size}: Azure retired the {series} sizes on {date}; "
                    f"use {SIZE_REPLACEMENT.get(name, 'a current size')} instead"
                )
    return problems


@dataclass(frozen=True)
class CatalogModel:
    """A catalog model version as the registry returns it."""

    name: str
    version: str
    id: str  # azureml://registries/<registry>/models/<name>/versions/<version>
    tags: dict[str, str] = field(default_factory=dict)  # the version's tags and properties

    def value(self, *keys: str) -> str | None:
        """The first tag or property named like one of `keys`, case aside; a dotted name
        (`deprecation.finetuneRetirementDate`, as system metadata is flattened) matches by its last part."""
        wanted = {k.lower() for k in keys}
        for key, value in self.tags.items():
            if key.lower() in wanted or key.lower().rsplit(".", 1)[-1] in wanted:
                return str(value)
        return None

    def date(self, tag: str) -> dt.date | None:
        raw = (self.value(tag) or "").strip()
        try:
            return dt.date.fromisoformat(raw[:10]) if raw else None
        except ValueError:
            log.warning("catalog model %s has an unreadable %s tag: %r", self.name, tag, raw)
            return None

    @property
    def deploy_regions(self) -> list[str] | None:
        """The regions a fine-tuned copy may be deployed in, or None when the registry does not say.

        The tag is a YAML list in the model's spec; the registry keeps tags as strings, so any of
        "eastus2,eastus", "['eastus2', 'eastus']" or '["eastus2"]' is read alike."""
        raw = self.value(*DEPLOY_REGIONS_KEYS)
        regions = re.findall(r"[a-z][a-z0-9]+", str(raw).lower()) if raw is not None else []
        return regions or None  # an empty list says nothing either


def replacement_of(name: str) -> str | None:
    for pattern, successor in REPLACEMENTS:
        if pattern.match(name) and successor.lower() != name.lower():
            return successor
    return None


def _instead(model: CatalogModel) -> str:
    successor = replacement_of(model.name)
    if successor:
        return f"its replacement is {successor}: set AZURE_CATALOG_MODEL={successor}"
    return "pick a current model in ml.azure.com → Model catalog and set AZURE_CATALOG_MODEL to its name"


def lifecycle_problems(
    model: CatalogModel, uses: Iterable[str], *, today: dt.date | None = None, region: str | None = None,
) -> tuple[list[str], list[str]]:
    """(problems, warnings) of using `model` for `uses` ("fine-tuning", "inference") in `region`.

    A problem: the model is past a retirement date, or `region` is not among its deploy regions.
    A warning: a retirement within WARN_DAYS, or a deprecation date passed (new use may stop any day)."""
    today = today or dt.date.today()
    problems: list[str] = []
    warnings: list[str] = []
    for use in uses:
        deprecation_tag, retirement_tag = LIFECYCLE_TAGS[use]
        retired, deprecated = model.date(retirement_tag), model.date(deprecation_tag)
        if retired is not None and retired <= today:
            problems.append(
                f"AZURE_CATALOG_MODEL={model.name}: Azure retired it for {use} on {retired.isoformat()} "
                f"(registry tag {retirement_tag} of version {model.version}); {_instead(model)}"
            )
        elif retired is not None and (retired - today).days <= WARN_DAYS:
            warnings.append(
                f"AZURE_CATALOG_MODEL={model.name}: Azure retires it for {use} on {retired.isoformat()} "
                f"(in {(retired - today).days} days); {_instead(model)}"
            )
        elif deprecated is not None and deprecated <= today:
            warnings.append(
                f"AZURE_CATALOG_MODEL={model.name}: deprecated for {use} since {deprecated.isoformat()}"
                + (f", retiring on {retired.isoformat()}" if retired else "") + f"; {_instead(model)}"
            )
    regions = model.deploy_regions
    if region is not None and regions is not None and region.lower() not in regions:
        problems.append(
            f"AZURE_CATALOG_MODEL={model.name}: a fine-tuned copy can be deployed only in {', '.join(regions)} "
            f"(registry tag {DEPLOY_REGIONS_TAG}); workspace {region!r} is elsewhere: use a workspace in one "
            "of those regions (AZURE_ML_WORKSPACE_NAME, AZURE_RESOURCE_GROUP_NAME)"
        )
    elif region is not None and regions is None:
        warnings.append(
            f"AZURE_CATALOG_MODEL={model.name}: the registry lists no {DEPLOY_REGIONS_TAG}; "
            f"the region {region} could not be checked before submitting"
        )
    return problems, warnings


def fetch_catalog_model(settings: config.Settings, registry_client: "MLClient") -> CatalogModel:
    """The latest version of AZURE_CATALOG_MODEL in AZURE_CATALOG_REGISTRY (a GET: nothing is created)."""
    from azure.core.exceptions import ResourceNotFoundError

    from finetune_phi.azure import client

    name, registry = settings.AZURE_CATALOG_MODEL, settings.AZURE_CATALOG_REGISTRY
    with client.azure_errors(f"reading catalog model {name} from registry {registry}"):
        try:
            found: Any = registry_client.models.get(name, label="latest")
        except ResourceNotFoundError as exc:
            raise RuntimeError(
                f"AZURE_CATALOG_MODEL={name}: registry {registry} has no such model ({client._first_line(exc)}); "
                "check the name in ml.azure.com → Model catalog (names are case-sensitive), e.g. Phi-4-mini-instruct"
            ) from exc
    version = str(found.version)
    return CatalogModel(
        name=str(found.name),
        version=version,
        id=entities.catalog_model_id(settings, version),
        tags={str(k): str(v) for source in (getattr(found, "properties", None), getattr(found, "tags", None))
              for k, v in (source or {}).items()},
    )


def require_usable(
    model: CatalogModel, uses: Iterable[str], *, today: dt.date | None = None, region: str | None = None,
) -> None:
    """Log the warnings; raise ConfigError with the problems (in one message) before anything is billed."""
    problems, warnings = lifecycle_problems(model, uses, today=today, region=region)
    for warning in warnings:
        log.warning("%s", warning)
    if problems:
        raise config.ConfigError(problems)
    log.info("catalog model %s version %s: usable for %s%s", model.name, model.version, " and ".join(uses),
             f" in {region}" if region else "")  # fmt: skip
