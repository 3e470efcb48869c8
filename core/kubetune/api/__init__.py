"""The kubetune API (group kubetune.io, version v1alpha1): the one definition of every field."""

from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus, AdapterRef
from .common import API_VERSION, GROUP, VERSION, Condition, ModelSource, Rule
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .kinds import BY_KIND, KINDS
from .manifest import Checked, check_file, load_one, parse
from .uris import uri_problem
from .validation import Problem, validate
from .yamlsafe import ManifestError

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
    "ManifestError",
    "ModelSource",
    "Problem",
    "Rule",
    "check_file",
    "load_one",
    "parse",
    "uri_problem",
    "validate",
]
