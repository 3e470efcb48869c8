"""The cluster fixtures (`cluster`, `namespace`, `crds`, `helm`): a real control plane
(tests/cluster/harness.py) for tests marked `cluster`, and for the e2e tier's operator container.

A pytest plugin, registered by `pytest_plugins` in tests/conftest.py, so every tier uses the same
fixtures without importing a conftest.

If a cluster started with `python3 tests/cluster/harness.py up` is running (same clone), the
session reuses it and leaves it running (KUBETUNE_CLUSTER_FRESH=1: never reuse); otherwise it
starts one (`kwokctl create cluster`, ~5 s) and deletes it at the end; a session that is killed has
its cluster deleted by the harness's watchdog, and a leftover is deleted before the next start.
Without built binaries every cluster test is skipped with a loud "cluster tier NOT RUN" reason.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("kubetune_cluster_harness", Path(__file__).with_name("harness.py"))
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)

_NOT_RUN: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local Kubernetes control plane (tests/cluster/harness.py)")


def _not_run(reason: str) -> None:
    # tests/conftest.py collects reasons containing "NOT RUN" into its loud end-of-run summary.
    msg = f"cluster tier NOT RUN: {reason}"
    _NOT_RUN.append(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def cluster():
    """A LocalCluster: `.kubeconfig`, `.kubectl(*args)`, pod helpers (succeed_pod, fail_pod, evict_pod ...)."""
    if _NOT_RUN:
        pytest.skip(_NOT_RUN[0])
    try:
        c = harness.LocalCluster()
    except harness.ClusterBinariesMissing as e:
        _not_run(str(e))
    if os.environ.get("KUBETUNE_CLUSTER_FRESH") != "1":
        try:
            c.attach()
            print(f"\ncluster: reusing the running cluster {c.server} (harness.py up)", file=sys.stderr)
            yield c
            return
        except harness.ClusterError:
            pass
    c.start()  # binaries present but no cluster: a failure here is an error, not a skip
    print(f"\ncluster: started {c.server} in {c._state.get('ready_s')} s", file=sys.stderr)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def namespace(cluster):
    """A fresh namespace (its default service account exists), deleted afterwards."""
    ns = cluster.create_namespace("t-")
    yield ns
    cluster.delete_namespace(ns)


@pytest.fixture(scope="session")
def crds(cluster):
    """The kubetune CRDs (crds/) applied with `kubectl apply --server-side`, Established and served.

    Returns the CRD names. A rejected CRD fails every test that needs it with the API server's own
    words. The CRDs are left installed (a reused `harness.py up` cluster keeps them)."""
    applied = cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(harness.REPO / "crds"), "-o", "name", check=False
    )
    if applied.returncode != 0:
        pytest.fail(f"the API server rejected crds/:\n{applied.stderr.strip()}", pytrace=False)
    names = [line.split("/", 1)[1] for line in applied.stdout.split()]
    for name in names:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        crd = cluster.get("crd", name)
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        for version in (v["name"] for v in crd["spec"]["versions"] if v.get("served")):
            # The REST endpoint can lag the Established condition by a moment.
            path = f"/apis/{group}/{version}/{plural}"
            cluster.wait_for(lambda path=path: cluster.api("GET", f"{path}?limit=1")[0] == 200, f"{path} served")
    return names


def helm_runner(cluster, home: Path):
    """`run(*args, timeout=60)`: the cluster's helm binary with its caches under `home` and the
    cluster's kubeconfig; skipped (NOT RUN, with the fix) where no helm was built."""
    binary = cluster.bin_dir / "helm"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"cluster tier NOT RUN: no helm in {cluster.bin_dir}; run `bash scripts/k8s-build.sh`")
    env = dict(
        os.environ,
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(cluster.kubeconfig),
    )

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(binary), *args], capture_output=True, text=True, env=env, cwd=harness.REPO, timeout=timeout
        )

    return run


@pytest.fixture
def helm(cluster, tmp_path):
    return helm_runner(cluster, tmp_path)
