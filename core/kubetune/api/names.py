"""What a kubetune object may be called: one definition for `kubetune validate`, the API server and the operator.

Kubernetes only asks a custom object's name to be a DNS subdomain (253 characters, dots allowed),
but the operator names children after the object, and some of those names are stricter:

- a FineTuneJob `NAME` gets the headless Service `NAME-workers` and pods with the hostnames
  `NAME-INDEX`; a Service name is a DNS-1035 label (63 characters, starting with a letter, no
  dots), so NAME may have at most 63 - len("-workers") = 55 characters;
- an AdapterDeployment `NAME` gets the Service `NAME` (and the Deployment and ConfigMap
  `NAME-adapters`), so NAME must itself be a DNS-1035 label of at most 63 characters.

`name_rules(kind)` puts the same rule into the CRD as root-level CEL on `self.metadata.name` (the
one part of metadata a CRD's rules may read), so the API server refuses such a name at create
time instead of the operator marking the object Failed afterwards; `name_problems` is the Python
twin with the same words.
"""

import re
from dataclasses import dataclass

from .rules import Rule
from .uris import cel_string

MAX_DNS_LABEL = 63
DNS_1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_LABEL = re.compile(DNS_1035_LABEL_PATTERN)
# Suffixes the operator appends to a FineTuneJob's name for a child whose name is a DNS label.
FINETUNEJOB_SERVICE_SUFFIX = "-workers"


@dataclass(frozen=True)
class NameRule:
    """The names of one kind: a DNS-1035 label of at most `max_length` characters."""

    kind: str
    max_length: int
    why: str

    @property
    def format_message(self) -> str:
        return (
            "metadata.name must consist of lowercase letters, digits and '-', start with a letter and end "
            f"with a letter or digit (no dots): it names {self.why}"
        )

    @property
    def length_message(self) -> str:
        return f"metadata.name must be at most {self.max_length} characters: it names {self.why}"


NAME_RULES = {
    "FineTuneJob": NameRule(
        "FineTuneJob",
        MAX_DNS_LABEL - len(FINETUNEJOB_SERVICE_SUFFIX),
        f"the trainer Service NAME{FINETUNEJOB_SERVICE_SUFFIX} and the pod hostnames NAME-INDEX, "
        f"which must be DNS labels of at most {MAX_DNS_LABEL} characters",
    ),
    "AdapterDeployment": NameRule(
        "AdapterDeployment",
        MAX_DNS_LABEL,
        f"the Service in front of the replicas, which must be a DNS label of at most {MAX_DNS_LABEL} characters",
    ),
}
MISSING_MESSAGE = "metadata.name is required"


def name_problems(kind: str, name: object) -> list[str]:
    """What makes `name` unusable for an object of `kind` (empty when it is fine)."""
    rule = NAME_RULES.get(kind)
    if rule is None:
        return []
    if name is None or name == "":
        return [MISSING_MESSAGE]
    if not isinstance(name, str):
        return [f"metadata.name must be a string, not {type(name).__name__}"]
    problems = []
    if not DNS_1035_LABEL.match(name):
        problems.append(rule.format_message)
    if len(name) > rule.max_length:
        problems.append(rule.length_message)
    return problems


def name_rules(kind: str) -> list[dict[str, str]]:
    """The root-level `x-kubernetes-validations` of the CRD of `kind` (the API server fills in a
    generateName before it validates, so the name is always there)."""
    rule = NAME_RULES[kind]
    return [
        Rule(
            cel=f"self.metadata.name.matches({cel_string(DNS_1035_LABEL_PATTERN)})", message=rule.format_message
        ).to_crd(),
        Rule(cel=f"self.metadata.name.size() <= {rule.max_length}", message=rule.length_message).to_crd(),
    ]
