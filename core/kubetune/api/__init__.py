"""The kubetune API (group kubetune.io, version v1alpha1): the one definition of every field."""

from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus, AdapterRef
from .common import API_VERSION, GROUP, VERSION, Condition, ModelSource, Rule
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .kinds import BY_KIND, KINDS
from .manifest import Checked, check_file, load_one, parse
from .validation import Problem, validate

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "AdapterRef",
    "BY_KIND",
    "Checked",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "KINDS",
    "ModelSource",
    "Problem",
    "Rule",
    "check_file",
    "load_one",
    "parse",
    "validate",
]
