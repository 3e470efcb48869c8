"""The CRDs' version table (crdgen.VERSIONS): v1alpha1 served and stored today, and the path to
v1beta1 that helm/kubetune/UPGRADING.md describes. A second version generates a CRD the API server
accepts (tests/cluster/test_upgrade.py applies one): both served, one stored, conversion None
written out; tables the API server would refuse, or that would cut the operator off, are refused
here with one sentence."""

import pytest
import yaml

from kubetune.api import crdgen
from kubetune.api.crdgen import ApiVersion, VersionTableError
from kubetune.api.kinds import FINETUNEJOB, KINDS
from tests.examples import REPO

pytestmark = pytest.mark.unit

ALPHA = ApiVersion("v1alpha1", served=True, storage=True)
BETA = ApiVersion("v1beta1", served=True, storage=False)
# The release after: v1beta1 stored, v1alpha1 still served, deprecated with a warning.
BETA_STORED = (
    ApiVersion("v1alpha1", served=True, deprecated=True, deprecation_warning="kubetune.io/v1alpha1 is deprecated"),
    ApiVersion("v1beta1", served=True, storage=True),
)


def by_name(crd: dict) -> dict[str, dict]:
    return {v["name"]: v for v in crd["spec"]["versions"]}


def test_today_one_version_served_and_stored():
    assert [v.name for v in crdgen.VERSIONS if v.storage] == ["v1alpha1"]
    assert all(v.served for v in crdgen.VERSIONS if v.name == "v1alpha1")
    for info in KINDS:
        crd = yaml.safe_load((REPO / "crds" / crdgen.file_name(info)).read_text())
        [version] = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert "conversion" not in crd["spec"]  # one version: nothing to convert, files unchanged


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_adding_v1beta1_serves_both_and_stores_the_old_one(info):
    crd = crdgen.crd(info, (ALPHA, BETA))
    versions = by_name(crd)
    assert list(versions) == ["v1alpha1", "v1beta1"]
    assert versions["v1alpha1"]["served"] and versions["v1alpha1"]["storage"]
    assert versions["v1beta1"]["served"] and not versions["v1beta1"]["storage"]
    assert crd["spec"]["conversion"] == {"strategy": "None"}
    alpha_schema = versions["v1alpha1"]["schema"]["openAPIV3Schema"]
    beta_schema = versions["v1beta1"]["schema"]["openAPIV3Schema"]
    assert beta_schema["properties"]["apiVersion"]["description"] == "kubetune.io/v1beta1"
    assert alpha_schema["properties"]["apiVersion"]["description"] == "kubetune.io/v1alpha1"
    # Strategy None is only right because nothing else differs between the two.
    strip = lambda s: {**s, "properties": {k: v for k, v in s["properties"].items() if k != "apiVersion"}}  # noqa: E731
    assert strip(alpha_schema) == strip(beta_schema)
    for key in ("subresources", "additionalPrinterColumns"):
        assert versions["v1alpha1"][key] == versions["v1beta1"][key]
    # The first version's entry is exactly today's.
    assert versions["v1alpha1"] == crdgen.crd(info)["spec"]["versions"][0]


def test_each_version_reads_on_its_own_in_the_yaml():
    """The second version's schema is written out, not a YAML alias (*id001) of the first's."""
    text = crdgen.render(FINETUNEJOB, (ALPHA, BETA))
    today = crdgen.render(FINETUNEJOB)
    assert text.count("*id") == 2 * today.count("*id")
    crd = yaml.safe_load(text.removeprefix(crdgen.HEADER))
    assert crd == crdgen.crd(FINETUNEJOB, (ALPHA, BETA))


def test_the_next_release_stores_v1beta1_and_deprecates_v1alpha1_with_a_warning():
    versions = by_name(crdgen.crd(FINETUNEJOB, BETA_STORED))
    alpha, beta = versions["v1alpha1"], versions["v1beta1"]
    assert alpha["served"] and not alpha["storage"] and beta["storage"]
    assert alpha["deprecated"] is True and alpha["deprecationWarning"] == "kubetune.io/v1alpha1 is deprecated"
    assert "deprecated" not in beta and "deprecationWarning" not in beta
    assert list(alpha)[:5] == ["name", "served", "storage", "deprecated", "deprecationWarning"]


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ((), "a CRD needs at least one version"),
        ((ApiVersion("v1alpha1"), ApiVersion("v1beta1")), "exactly one version must be the storage version; found 0"),
        (
            (ALPHA, ApiVersion("v1beta1", storage=True)),
            "exactly one version must be the storage version; found 2 (v1alpha1, v1beta1)",
        ),
        ((ApiVersion("v1alpha1", served=False, storage=True),), "the storage version v1alpha1 must be served"),
        (
            (ApiVersion("v1alpha1", served=False), ApiVersion("v1beta1", storage=True)),
            "v1alpha1 must stay served: the operator reads and writes through it",
        ),
        ((ALPHA, ApiVersion("v1alpha1")), "version v1alpha1 is listed twice"),
        ((ALPHA, ApiVersion("beta")), "'beta' is not a Kubernetes version name"),
        ((ALPHA, ApiVersion("v1beta1", deprecation_warning="old")), "has a deprecationWarning but is not deprecated"),
        ((ALPHA, ApiVersion("v1beta1", deprecated=True, deprecation_warning="x" * 257)), "over 256 characters"),
    ],
    ids=["empty", "no-storage", "two-storage", "storage-unserved", "operator-version-unserved", "duplicate",
         "bad-name", "warning-not-deprecated", "warning-too-long"],
)  # fmt: skip
def test_a_table_the_api_server_would_refuse_is_refused_with_one_sentence(versions, message):
    with pytest.raises(VersionTableError) as error:
        crdgen.crd(FINETUNEJOB, versions)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_webhook_conversion_is_refused_until_the_operator_serves_one():
    with pytest.raises(VersionTableError, match="conversion strategy 'Webhook' is not generated.*UPGRADING.md"):
        crdgen.crd(FINETUNEJOB, (ALPHA, BETA), conversion="Webhook")
