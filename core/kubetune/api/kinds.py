"""The kinds kubetune serves, with the names and columns their CRDs carry."""

from collections.abc import Mapping
from dataclasses import dataclass

from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from .common import ApiModel
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    model: type[ApiModel]
    spec_model: type[ApiModel]
    status_model: type[ApiModel]
    printer_columns: tuple[Mapping[str, object], ...]


AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

FINETUNEJOB = KindInfo(
    kind="FineTuneJob",
    plural="finetunejobs",
    short_names=("ftj",),
    model=FineTuneJob,
    spec_model=FineTuneJobSpec,
    status_model=FineTuneJobStatus,
    printer_columns=(
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "percent"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss"},
        {"name": "Tokens/s", "type": "number", "jsonPath": ".status.metrics.tokensPerSecond"},
        AGE,
    ),
)

ADAPTERDEPLOYMENT = KindInfo(
    kind="AdapterDeployment",
    plural="adapterdeployments",
    short_names=("adep",),
    model=AdapterDeployment,
    spec_model=AdapterDeploymentSpec,
    status_model=AdapterDeploymentStatus,
    printer_columns=(
        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Adapters", "type": "string", "jsonPath": ".status.adaptersReady"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        AGE,
    ),
)

KINDS = (FINETUNEJOB, ADAPTERDEPLOYMENT)
BY_KIND = {info.kind: info for info in KINDS}
