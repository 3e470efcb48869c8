"""kubectl, as a user would type it, against the cluster the e2e kind tier runs on.

The cluster is the one `KUBETUNE_E2E_KUBECONFIG` names (make test sets it to kind's
.cache/kind/kubeconfig), else `KUBECONFIG`: the same test runs on any cluster with kubetune's chart
installed and its images available. kubectl is scripts/k8s-build.sh's (the cluster's version), else
the one on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def kubeconfig() -> str | None:
    return os.environ.get("KUBETUNE_E2E_KUBECONFIG") or os.environ.get("KUBECONFIG") or None


def kubectl_binary() -> str | None:
    versions = dict(
        line.split("=", 1) for line in (REPO / "scripts" / "k8s-versions.env").read_text().splitlines() if "=" in line
    )
    cache = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
    built = cache / "k8s" / versions["K8S_VERSION"] / "bin" / "kubectl"
    return str(built) if os.access(built, os.X_OK) else shutil.which("kubectl")


class KubectlError(AssertionError):
    pass


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
    """Run kubectl; on failure the assertion shows the command and its output."""
    binary = kubectl_binary()
    assert binary, "no kubectl (scripts/k8s-build.sh builds one)"
    command = [binary, *(["--kubeconfig", kubeconfig()] if kubeconfig() else []), *args]
    run = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise KubectlError(
            f"`kubectl {' '.join(args)}` exited {run.returncode}:\n{run.stderr[-3000:]}{run.stdout[-2000:]}"
        )
    return run.stdout


def get(kind: str, name: str | None = None, namespace: str | None = None, label: str | None = None) -> Any:
    """`kubectl get -o json`: one object (None when it does not exist) or the list's items."""
    args = ["get", kind, *([name] if name else []), "-o", "json"]
    if namespace:
        args += ["-n", namespace]
    elif not name:
        args += ["--all-namespaces"]
    if label:
        args += ["-l", label]
    if name:
        out = kubectl(*args, check=False)
        return json.loads(out) if out.strip() else None
    return json.loads(kubectl(*args))["items"]


def apply(manifest: dict | str, namespace: str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    kubectl("apply", "-n", namespace, "-f", "-", input=text)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll probe() until it returns something truthy; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def evict(pod: str, namespace: str) -> None:
    """The Eviction API, as a drain or the scheduler's preemption does: the pod gets DisruptionTarget."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", "-f", "-", input=json.dumps(body))


def cluster_problem() -> str | None:
    """Why the kind tier cannot run against this cluster, or None."""
    if not kubectl_binary():
        return "no kubectl: run `make kind-up` (it builds one) or put kubectl on PATH"
    if not kubeconfig():
        return "no cluster: `make kind-up` creates one (KUBECONFIG=.cache/kind/kubeconfig), or set KUBECONFIG"
    try:
        kubectl("get", "--raw", "/readyz", timeout=20)
        kubectl("get", "crd", "finetunejobs.kubetune.io", "adapterdeployments.kubetune.io", timeout=20)
        ready = kubectl(
            "get", "deployment", "-A", "-l", "app.kubernetes.io/name=kubetune,app.kubernetes.io/component=operator",
            "-o", "jsonpath={.items[*].status.readyReplicas}", timeout=20,
        )  # fmt: skip
    except (KubectlError, subprocess.TimeoutExpired) as error:
        return f"the cluster at {kubeconfig()} is not ready for kubetune ({str(error).splitlines()[0]}); `make kind-up`"
    if not ready.strip() or ready.strip() == "0":
        return f"kubetune's operator is not running in the cluster at {kubeconfig()}; `make kind-up` installs the chart"
    return None
