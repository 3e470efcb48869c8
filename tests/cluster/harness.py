#!/usr/bin/env python3
"""A real Kubernetes control plane for tests, from locally built binaries, started in seconds.

    python3 tests/cluster/harness.py up       # start (or report the running one); prints KUBECONFIG
    python3 tests/cluster/harness.py status   # is it up? which components, pids
    python3 tests/cluster/harness.py down     # `kwokctl delete cluster`

``kwokctl create cluster --runtime binary`` starts it, from the binaries ``bash scripts/k8s-build.sh``
builds (versions in scripts/k8s-versions.env; kwokctl is handed every binary, so it downloads
nothing): etcd, kube-apiserver (RBAC,Node; client-cert auth), kube-controller-manager (all default
controllers: Jobs make pods, garbage collection, namespaces, service accounts, CSR signing, ...),
kube-scheduler and kwok, which plays the kubelet for every node. Everything listens on 127.0.0.1
only. This module adds the flags kwokctl does not set (``_config``), the nodes, and the readiness
check: two 8-GPU nodes (tainted nvidia.com/gpu=present:NoSchedule, zones zone-a / zone-b) and one
CPU node, all Ready.

Pods on the fake nodes go Running on their own and stay Running until a test decides how they end:

* ``succeed_pod`` / ``fail_pod`` (or the annotations ``ANN_RESULT`` = Succeeded|Failed with optional
  ``ANN_RESULT_AFTER`` e.g. "2s", ``ANN_EXIT_CODE``, ``ANN_REASON``, ``ANN_MESSAGE``, set on a pod or
  on a Job's pod template) - kwok stages below then terminate the containers and set the phase.
* ``hold_pod`` (or the annotations ``ANN_WAITING_REASON`` + ``ANN_WAITING_MESSAGE`` on a Running,
  Ready pod) - its containers wait with that reason, as the kubelet reports an image it cannot pull
  (ErrImagePull, ImagePullBackOff, InvalidImageName; phase Pending), a missing Secret or ConfigMap
  key (CreateContainerConfigError) or a crash loop (CrashLoopBackOff, phase Running, with the last
  termination from ``ANN_EXIT_CODE``, ``ANN_REASON``, ``ANN_MESSAGE``). Out of memory is ``fail_pod``
  with reason OOMKilled and exit code 137.
* ``evict_pod`` - the Eviction API: the API server adds the DisruptionTarget condition and deletes
  the pod; kwok then plays the kubelet (containers killed, phase Failed) and removes the pod once its
  finalizers (e.g. the Job controller's) are gone.

Everything lives in ``.cache/cluster/``: kubeconfig (self-contained), kwokctl.yaml (the config
handed to kwokctl), state.json, and kwok/ (KWOK_WORKDIR: clusters/kubetune/{pki,logs,pids,etcd};
kwokctl deletes that with the cluster, so its logs are copied to logs/ first).
``up`` starts from an empty etcd every time. kwokctl detaches the components (their own sessions);
a test session's cluster is deleted when the session ends, killed or not (a watchdog process), and
any leftover of this clone is deleted before a new one starts. Standard library only.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO / "scripts" / "k8s-versions.env"
BUILD_SCRIPT = "bash scripts/k8s-build.sh"
DATA_DIR = REPO / ".cache" / "cluster"
CLUSTER_NAME = "kubetune"
REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "kwokctl",
)
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
NODE_IP = "10.0.0.1"
# kwokctl's environment: a download it attempted would go to this proxy, where nothing listens, and
# fail at once. Loopback is never proxied; the cluster's own ranges are exempt (its components
# inherit this environment, e.g. the API server calling a webhook at a pod IP).
DEAD_PROXY = "http://127.0.0.1:9"
NO_PROXY = f"localhost,127.0.0.1,{POD_CIDR},{SERVICE_CIDR},{NODE_IP}"

# Annotations the kwok stages of this harness react to (on a pod, or on a Job's pod template).
ANN_RESULT = "kubetune.test/pod-result"  # "Succeeded" | "Failed"
ANN_RESULT_AFTER = "kubetune.test/pod-result-after"  # Go duration, e.g. "2s" (default: at once)
ANN_EXIT_CODE = "kubetune.test/exit-code"  # Failed only; default 1
ANN_REASON = "kubetune.test/reason"  # Failed only; default "Error"
ANN_MESSAGE = "kubetune.test/message"  # Failed only; default "container failed"
ANN_WAITING_REASON = "kubetune.test/waiting-reason"  # ErrImagePull, CrashLoopBackOff, ... (hold_pod)
ANN_WAITING_MESSAGE = "kubetune.test/waiting-message"  # the waiting state's message
# The stage the waiting annotations need: a cluster started before it was added lacks it.
WAITING_STAGE = "kubetune-pod-waiting"

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"  # informative: kwokctl's kwok manages every node
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


class ClusterError(RuntimeError):
    """The local control plane could not be started or driven."""


class ClusterBinariesMissing(ClusterError):
    """The Kubernetes binaries are not built."""


# ------------------------------------------------------------------------------------------------
# Fake nodes.


def _node(name: str, labels: dict[str, str], capacity: dict[str, str], taints: list[dict]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        "spec": {"taints": taints},
        "status": {"capacity": dict(capacity), "allocatable": dict(capacity)},
    }


def default_nodes() -> list[dict]:
    """Two H100 GPU nodes (one per zone) as GPU pools have them, and one untainted CPU node."""
    nodes = []
    for name, zone in (("gpu-node-a", "zone-a"), ("gpu-node-b", "zone-b")):
        nodes.append(
            _node(
                name,
                {
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    "nvidia.com/gpu.count": "8",
                    "nvidia.com/gpu.present": "true",
                    "topology.kubernetes.io/zone": zone,
                    "topology.kubernetes.io/region": "test-region",
                    "node.kubernetes.io/instance-type": "p5.48xlarge",
                },
                {
                    "cpu": "192",
                    "memory": "2000Gi",
                    "ephemeral-storage": "7000Gi",
                    "pods": "110",
                    GPU_RESOURCE: "8",
                },
                [dict(GPU_TAINT)],
            )
        )
    nodes.append(
        _node(
            "cpu-node",
            {
                "topology.kubernetes.io/zone": "zone-a",
                "topology.kubernetes.io/region": "test-region",
                "node.kubernetes.io/instance-type": "m5.8xlarge",
            },
            {"cpu": "32", "memory": "128Gi", "ephemeral-storage": "500Gi", "pods": "110"},
            [],
        )
    )
    return nodes


# ------------------------------------------------------------------------------------------------
# kwok pod stages (tests/cluster/kwok-pod-stages.yaml) replace kwok's default pod stages, whose
# pod-complete finishes every Job pod at once.

POD_STAGES_FILE = Path(__file__).with_name("kwok-pod-stages.yaml")


def kwok_pod_stages() -> str:
    text = POD_STAGES_FILE.read_text()
    for name, value in (
        ("ANN_RESULT_AFTER", ANN_RESULT_AFTER),
        ("ANN_RESULT", ANN_RESULT),
        ("ANN_EXIT_CODE", ANN_EXIT_CODE),
        ("ANN_REASON", ANN_REASON),
        ("ANN_MESSAGE", ANN_MESSAGE),
        ("ANN_WAITING_REASON", ANN_WAITING_REASON),
        ("ANN_WAITING_MESSAGE", ANN_WAITING_MESSAGE),
    ):
        text = text.replace(f'"{name}"', f'"{value}"')
    return text


# ------------------------------------------------------------------------------------------------
# Helpers.


def _ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return status.get("phase") == "Running" and ready


def _waiting_reason(pod: dict) -> str | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        reason = ((container.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            return reason
    return None


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip().strip('"')
    return versions


def find_bin_dir() -> Path:
    """The directory holding the built binaries, or ClusterBinariesMissing naming the build script."""
    version = read_versions()["K8S_VERSION"]
    cache = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
    candidates = []
    if os.environ.get("KUBETUNE_K8S_BIN"):
        candidates.append(Path(os.environ["KUBETUNE_K8S_BIN"]))
    candidates += [REPO / ".cache" / "k8s" / version / "bin", cache / "k8s" / version / "bin"]
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in REQUIRED_BINARIES):
            return d
    best = max(candidates, key=lambda d: sum(os.access(d / b, os.X_OK) for b in REQUIRED_BINARIES))
    missing = [b for b in REQUIRED_BINARIES if not os.access(best / b, os.X_OK)]
    raise ClusterBinariesMissing(
        f"Kubernetes {version} binaries not built (missing {', '.join(missing)} in {best}; "
        f"also looked in {', '.join(str(d) for d in candidates if d != best)}); "
        f"run `{BUILD_SCRIPT}` (~13 min cold, builds from the Go module proxy)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # field 22: starttime; a zombie counts as gone


def _pid_alive(pid: int, starttime: str | None = None) -> bool:
    st = _proc_starttime(pid)
    return st is not None and (starttime is None or st == starttime)


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll fn until it returns something truthy; ClusterError naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc})" if last_exc else ""
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


# Started with a test session's cluster (argv: STATE_FILE OWNER_PID KWOKCTL-DELETE-COMMAND...): waits
# for EOF on stdin (the session's end, however it ends, SIGKILL included), then deletes the cluster,
# unless the session said "stopped" first or state.json names another owner by then.
_WATCHDOG = """
import json, os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
state_file, owner = sys.argv[1], int(sys.argv[2])
if sys.stdin.buffer.read() != b"stopped":
    try:
        mine = json.load(open(state_file)).get("owner_pid") == owner
    except (OSError, ValueError):
        mine = False
    if mine:
        subprocess.run(sys.argv[3:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        try:
            os.unlink(state_file)
        except OSError:
            pass
"""


# ------------------------------------------------------------------------------------------------


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on 127.0.0.1, by kwokctl.

    ``LocalCluster().start()`` (or ``with LocalCluster() as c:``) brings it up; ``stop()`` deletes it
    (``kwokctl delete cluster``). ``attach()`` adopts one already started by ``harness.py up``.
    """

    ANN_RESULT = ANN_RESULT
    ANN_RESULT_AFTER = ANN_RESULT_AFTER
    ANN_EXIT_CODE = ANN_EXIT_CODE
    ANN_REASON = ANN_REASON
    ANN_MESSAGE = ANN_MESSAGE
    ANN_WAITING_REASON = ANN_WAITING_REASON
    ANN_WAITING_MESSAGE = ANN_WAITING_MESSAGE
    GPU_RESOURCE = GPU_RESOURCE
    GPU_TOLERATION = GPU_TOLERATION

    def __init__(
        self, data_dir: Path | str = DATA_DIR, bin_dir: Path | str | None = None, nodes: list[dict] | None = None
    ):
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        missing = [b for b in REQUIRED_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ClusterBinariesMissing(f"missing in {self.bin_dir}: {', '.join(missing)}; run `{BUILD_SCRIPT}`")
        self.data_dir = Path(data_dir)
        self.kubeconfig = self.data_dir / "kubeconfig"
        self.state_file = self.data_dir / "state.json"
        self.config_file = self.data_dir / "kwokctl.yaml"
        self.workdir = self.data_dir / "kwok"  # KWOK_WORKDIR
        self.cluster_dir = self.workdir / "clusters" / CLUSTER_NAME
        self.pki = self.cluster_dir / "pki"
        self.logs = self.cluster_dir / "logs"
        self.nodes = nodes if nodes is not None else default_nodes()
        self.versions = read_versions()
        self.ports: dict[str, int] = {}
        self._state: dict[str, Any] = {}
        self._ssl: ssl.SSLContext | None = None
        self._watchdog: subprocess.Popen | None = None
        self.server = ""
        self.started_here = False

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90, die_with_parent: bool = True) -> LocalCluster:
        """Start from scratch (a cluster of this data dir left running is deleted first).

        die_with_parent: the cluster is deleted when this process ends, however it ends (for test
        sessions; the CLI's `up` passes False so it outlives it). A component that exits during
        startup (say a free port taken meanwhile by another process) gets one more attempt."""
        try:
            return self._start(timeout, die_with_parent)
        except ClusterError as e:
            if "exited" not in str(e):
                raise
            print(f"harness: {e}; starting again", file=sys.stderr)
            return self._start(timeout, die_with_parent)

    def _start(self, timeout: float, die_with_parent: bool) -> LocalCluster:
        t0 = time.monotonic()
        self.stop_recorded()  # a leftover of this clone (say of a session that was killed)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        (self.data_dir / "home").mkdir(parents=True)
        self._ssl = None
        self.ports = {
            name: free_port() for name in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler", "kwok")
        }
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        self.config_file.write_text(self._config())
        self._state = {
            "name": CLUSTER_NAME,
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ports": self.ports,
            "bin_dir": str(self.bin_dir),
            "owner_pid": os.getpid() if die_with_parent else None,
            "owner_starttime": _proc_starttime(os.getpid()) if die_with_parent else None,
        }
        self._save_state()  # before kwokctl runs: whatever it starts is found and deleted from here on
        self.started_here = True
        if die_with_parent:
            self._start_watchdog()
        try:
            r = self._kwokctl("create", f"--config={self.config_file}", timeout=max(10.0, timeout))
            if r.returncode != 0:
                raise ClusterError(f"kwokctl create cluster failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
            self._write_kubeconfig()
            self._wait_ready(t0, timeout)
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        self._state["ready_s"] = round(time.monotonic() - t0, 1)
        self._save_state()
        return self

    def attach(self) -> LocalCluster:
        """Adopt the cluster recorded in state.json (started by `harness.py up`, or by a test session
        that is still running), if healthy."""
        state = self._load_state()
        if not state or not self._components_alive():
            raise ClusterError(f"no running cluster recorded in {self.state_file}")
        owner = state.get("owner_pid")
        if owner is not None and not _pid_alive(owner, state.get("owner_starttime")):
            raise ClusterError(f"the recorded cluster was left over by process {owner}, which is gone")
        self._state = state
        self.ports = state["ports"]
        self.server = state["server"]
        self.started_here = False
        if not self.healthy():
            raise ClusterError("the recorded cluster is running but not healthy")
        return self

    def stop(self) -> None:
        """Delete the cluster (`kwokctl delete cluster`: every component is killed, its files go)."""
        self.stop_recorded()
        if self._watchdog is not None:
            try:
                self._watchdog.communicate(b"stopped", timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._watchdog = None

    def stop_recorded(self) -> bool:
        """Delete the cluster recorded in state.json (or found in the kwok workdir), if any; True if
        there was one."""
        found = self.state_file.exists() or self.cluster_dir.exists()
        if self.cluster_dir.exists():
            if self.logs.is_dir():  # kwokctl deletes them with the cluster
                shutil.copytree(self.logs, self.data_dir / "logs", dirs_exist_ok=True)
            r = self._kwokctl("delete", timeout=120)
            if r.returncode != 0:
                raise ClusterError(f"kwokctl delete cluster failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        self.state_file.unlink(missing_ok=True)
        return found

    def healthy(self) -> bool:
        try:
            status, _ = self.api("GET", "/readyz")
            return status == 200
        except Exception:  # noqa: BLE001
            return False

    def component_pids(self) -> dict[str, int]:
        """{component: pid} from kwokctl's pid files."""
        pids = {}
        for f in sorted((self.cluster_dir / "pids").glob("*.pid")):
            try:
                pids[f.stem] = int(f.read_text().strip())
            except (OSError, ValueError):
                pids[f.stem] = -1
        return pids

    def _components_alive(self) -> bool:
        pids = self.component_pids()
        return bool(pids) and all(_pid_alive(p) for p in pids.values())

    # -- kwokctl ---------------------------------------------------------------------------------

    def _kwokctl_env(self) -> dict[str, str]:
        # HOME: kwokctl would read ~/.kwok/kwok.yaml; and kwok, ~/.kwok.
        env = dict(os.environ, KWOK_WORKDIR=str(self.workdir), HOME=str(self.data_dir / "home"))
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[var] = DEAD_PROXY
        env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
        return env

    def _kwokctl_argv(self, verb: str, *args: str) -> list[str]:
        # kwokctl adds (create) or removes (delete) a context in --kubeconfig, ~/.kube/config by
        # default: empty for create (none), a file of our HOME for delete (which rejects an empty one).
        # _write_kubeconfig writes ours.
        kubeconfig = "" if verb == "create" else self.data_dir / "home" / ".kube" / "config"
        kwokctl = str(self.bin_dir / "kwokctl")
        return [kwokctl, verb, "cluster", f"--name={CLUSTER_NAME}", f"--kubeconfig={kubeconfig}", *args]

    def _kwokctl(self, verb: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                self._kwokctl_argv(verb, *args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=self.data_dir if self.data_dir.is_dir() else None,
                env=self._kwokctl_env(),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"kwokctl {verb} cluster timed out after {timeout:.0f} s") from e

    def _start_watchdog(self) -> None:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.state_file), str(os.getpid()), *self._kwokctl_argv("delete")],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self._kwokctl_env(),
            start_new_session=True,  # not in the terminal's process group: Ctrl-C reaches the session only
        )
        atexit.register(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        if self._watchdog is not None:  # not stopped yet
            self.stop()

    def _config(self) -> str:
        """The KwokctlConfiguration (binaries, ports, flags) + KwokConfiguration + pod stages."""
        b, pki, p = self.bin_dir, self.pki, self.ports

        def args(**kv: str) -> list[dict]:
            return [{"key": k.replace("_", "-"), "value": v} for k, v in kv.items()]

        kwokctl = {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokctlConfiguration",
            "options": {
                "runtime": "binary",
                "bindAddress": "127.0.0.1",  # every component listens on loopback only
                "kubeApiserverCertSANs": ["127.0.0.1", "localhost"],
                "securePort": True,
                "disableQPSLimits": True,  # the controllers' client QPS/burst: 5000/10000
                # Every component's binary, so kwokctl downloads nothing (it symlinks local paths).
                "etcdBinary": str(b / "etcd"),
                "kubeApiserverBinary": str(b / "kube-apiserver"),
                "kubeControllerManagerBinary": str(b / "kube-controller-manager"),
                "kubeSchedulerBinary": str(b / "kube-scheduler"),
                "kwokControllerBinary": str(b / "kwok"),
                "kubectlBinary": str(b / "kubectl"),
                # Ports chosen here (bound on 127.0.0.1 to find them free), so kwokctl does not probe.
                "etcdPort": p["etcd"],
                "etcdPeerPort": p["etcd_peer"],
                "kubeApiserverPort": p["apiserver"],
                "kubeControllerManagerPort": p["controller_manager"],
                "kubeSchedulerPort": p["scheduler"],
                "kwokControllerPort": p["kwok"],
            },
            # Appended after kwokctl's own flags.
            "componentsPatches": [
                {"name": "etcd", "extraArgs": args(unsafe_no_fsync="true")},
                {
                    "name": "kube-apiserver",
                    "extraArgs": args(
                        endpoint_reconciler_type="none",
                        service_cluster_ip_range=SERVICE_CIDR,
                        # Front-proxy auth nobody can use (no cert has that CN); set so the delegated
                        # authentication of the controller-manager and scheduler does not log errors.
                        requestheader_client_ca_file=str(pki / "ca.crt"),
                        requestheader_allowed_names="kubetune-front-proxy-unused",
                        requestheader_username_headers="X-Remote-User",
                        requestheader_group_headers="X-Remote-Group",
                        requestheader_extra_headers_prefix="X-Remote-Extra-",
                        profiling="false",
                    ),
                },
                {
                    "name": "kube-controller-manager",
                    "extraArgs": args(
                        leader_elect="false",
                        controllers="*",
                        cluster_signing_cert_file=str(pki / "ca.crt"),  # CSRs get signed
                        cluster_signing_key_file=str(pki / "ca.key"),
                        service_cluster_ip_range=SERVICE_CIDR,
                        profiling="false",
                    ),
                },
                {"name": "kube-scheduler", "extraArgs": args(leader_elect="false", profiling="false")},
                # kwokctl passes --node-ip= (empty): the nodes would get no InternalIP.
                {"name": "kwok-controller", "extraArgs": [{"key": "node-ip", "value": NODE_IP, "override": True}]},
            ],
        }
        kwok = {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokConfiguration",
            "options": {"cidr": POD_CIDR},
        }
        # JSON is YAML; the stages are YAML documents of their own.
        return f"{json.dumps(kwokctl, indent=2)}\n---\n{json.dumps(kwok, indent=2)}\n---\n{kwok_pod_stages()}"

    def _write_kubeconfig(self) -> None:
        """kwokctl's kubeconfig refers to its pki files; ours holds them (a container can mount it)."""
        kwokctl_kubeconfig = self.cluster_dir / "kubeconfig.yaml"
        r = self.kubectl(
            "config", "view", "--raw", "--flatten", "--minify", "-o", "json", kubeconfig=kwokctl_kubeconfig
        )
        config = json.loads(r.stdout)
        config["clusters"][0]["cluster"]["server"] = self.server
        config["contexts"][0]["context"]["namespace"] = "default"
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))  # JSON is YAML
        tmp.chmod(0o600)
        tmp.replace(self.kubeconfig)

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(self._state, indent=2))

    def _load_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _check_processes(self) -> None:
        for name, pid in self.component_pids().items():
            if not _pid_alive(pid):
                raise ClusterError(f"{name} exited; see {self.logs / (name + '.log')}")

    def dump_logs(self, lines: int = 15, out=sys.stderr) -> None:
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {log} (last {len(tail)} lines)", file=out)
            for line in tail:
                print(f"  {line}", file=out)

    # -- readiness -------------------------------------------------------------------------------

    def _wait_ready(self, t0: float, timeout: float) -> None:
        def remaining() -> float:
            return max(1.0, timeout - (time.monotonic() - t0))

        def apiserver_ready() -> bool:
            self._check_processes()
            return self.healthy()

        wait_for(apiserver_ready, remaining(), "kube-apiserver /readyz", interval=0.1)
        for node in self.nodes:
            status, body = self.api("POST", "/api/v1/nodes", node)
            if status not in (201, 409):
                raise ClusterError(f"creating node {node['metadata']['name']}: {status} {body}")

        def component_healthy(port_name: str) -> bool:
            ctx = ssl._create_unverified_context()  # self-signed serving certs of the components
            url = f"https://127.0.0.1:{self.ports[port_name]}/healthz"
            with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                return r.status == 200

        def all_ready() -> bool:
            # kwokctl reports a cluster ready even when kwok has exited (say on a flag it rejects):
            # the nodes going Ready are what shows kwok works.
            self._check_processes()
            if not component_healthy("controller_manager") or not component_healthy("scheduler"):
                return False
            if self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] != 200:
                return False  # the serviceaccount controller (controller-manager) is working
            _, nodes = self.api("GET", "/api/v1/nodes")
            wanted = {n["metadata"]["name"] for n in self.nodes}
            ready = {
                n["metadata"]["name"]
                for n in nodes.get("items", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                and not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints") or [])
            }
            return wanted <= ready

        wait_for(all_ready, remaining(), "controller-manager, scheduler, default service account and Ready kwok nodes")

    # -- API access ------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def api(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", timeout: float = 10
    ) -> tuple[int, Any]:
        """A raw API request as the admin; returns (HTTP status, decoded JSON or text)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; CompletedProcess with text stdout/stderr.

        check=True raises ClusterError (with stderr) on a non-zero exit."""
        env = dict(
            os.environ,
            KUBECONFIG=str(kubeconfig or self.kubeconfig),
            KUBECACHEDIR=str(self.data_dir / "kubectl-cache"),
        )
        r = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def get(self, kind: str, name: str | None = None, namespace: str | None = None) -> dict | None:
        """kubectl get -o json; None when not found."""
        args = ["get", kind] + ([name] if name else []) + (["-n", namespace] if namespace else [])
        r = self.kubectl(*args, "-o", "json", check=False)
        if r.returncode != 0:
            if "NotFound" in r.stderr or "not found" in r.stderr:
                return None
            raise ClusterError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def apply(self, *objects: dict | str, namespace: str | None = None) -> subprocess.CompletedProcess:
        """kubectl apply of dicts (or YAML/JSON text)."""
        text = "\n---\n".join(o if isinstance(o, str) else json.dumps(o) for o in objects)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=text)

    def create_namespace(self, prefix: str = "t-") -> str:
        """A fresh namespace, returned once its default service account exists (pods need it)."""
        r = self.kubectl(
            "create",
            "-f",
            "-",
            "-o",
            "jsonpath={.metadata.name}",
            input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"generateName": prefix}}),
        )
        ns = r.stdout.strip()
        wait_for(
            lambda: self.api("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")[0] == 200,
            30,
            f"service account default in {ns}",
        )
        return ns

    def delete_namespace(self, ns: str) -> None:
        self.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)

    # -- pods ------------------------------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> dict | None:
        status, body = self.api("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        if status == 404:
            return None
        if status != 200:
            raise ClusterError(f"GET pod {namespace}/{name}: {status} {body}")
        return body

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        q = f"?labelSelector={urllib.request.quote(selector)}" if selector else ""
        status, body = self.api("GET", f"/api/v1/namespaces/{namespace}/pods{q}")
        if status != 200:
            raise ClusterError(f"list pods in {namespace}: {status} {body}")
        return body["items"]

    def wait_pod(
        self, namespace: str, name: str, predicate: Callable[[dict], bool], what: str, timeout: float = 30
    ) -> dict:
        def check() -> dict | None:
            p = self.pod(namespace, name)
            return p if p is not None and predicate(p) else None

        return wait_for(check, timeout, f"pod {namespace}/{name}: {what}")

    def wait_pod_phase(self, namespace: str, name: str, *phases: str, timeout: float = 30) -> dict:
        return self.wait_pod(
            namespace, name, lambda p: p.get("status", {}).get("phase") in phases, f"phase in {phases}", timeout
        )

    def wait_pod_gone(self, namespace: str, name: str, timeout: float = 30) -> None:
        wait_for(lambda: self.pod(namespace, name) is None, timeout, f"pod {namespace}/{name} deleted")

    def wait_job_pods(self, namespace: str, job: str, count: int = 1, timeout: float = 30) -> list[dict]:
        return wait_for(
            lambda: (lambda ps: ps if len(ps) >= count else None)(self.pods(namespace, f"job-name={job}")),
            timeout,
            f"{count} pod(s) of job {namespace}/{job}",
        )

    def _annotate(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        status, body = self.api(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {"metadata": {"annotations": annotations}},
            content_type="application/merge-patch+json",
        )
        if status != 200:
            raise ClusterError(f"annotating pod {namespace}/{name}: {status} {body}")

    def succeed_pod(self, namespace: str, name: str, wait: bool = True, timeout: float = 30) -> dict | None:
        """Make a Running pod's containers exit 0 (phase Succeeded), as kwok's kubelet would report."""
        self.wait_pod_phase(namespace, name, "Running", "Succeeded", "Failed", timeout=timeout)
        self._annotate(namespace, name, {ANN_RESULT: "Succeeded"})
        return self.wait_pod_phase(namespace, name, "Succeeded", timeout=timeout) if wait else None

    def succeed_pod_with_message(self, namespace: str, pod: dict, message: str) -> None:
        """Play the kubelet for a trainer that exited 0 leaving `message` as its termination message
        (kwok's success stage sets no message): the pod's status patched to Succeeded with it."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container = pod["spec"]["containers"][0]
        terminated = {"exitCode": 0, "reason": "Completed", "message": message, "startedAt": now, "finishedAt": now}
        status = {
            "phase": "Succeeded",
            "conditions": [
                {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
                for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {"name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                 "started": False, "restartCount": 0, "state": {"terminated": terminated}}
            ],
        }  # fmt: skip
        path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/status"
        code, body = self.api("PATCH", path, {"status": status}, content_type="application/merge-patch+json")
        if code != 200:
            raise ClusterError(f"patching the status of pod {namespace}/{pod['metadata']['name']}: {code} {body}")

    def fail_pod(
        self,
        namespace: str,
        name: str,
        exit_code: int = 1,
        reason: str = "Error",
        message: str = "container failed",
        wait: bool = True,
        timeout: float = 30,
    ) -> dict | None:
        """Make a Running pod's containers exit with exit_code (phase Failed)."""
        self.wait_pod_phase(namespace, name, "Running", "Succeeded", "Failed", timeout=timeout)
        self._annotate(
            namespace,
            name,
            {ANN_RESULT: "Failed", ANN_EXIT_CODE: str(exit_code), ANN_REASON: reason, ANN_MESSAGE: message},
        )
        return self.wait_pod_phase(namespace, name, "Failed", timeout=timeout) if wait else None

    def has_stage(self, name: str) -> bool:
        """Whether the running cluster's kwok was started with pod stage `name` (the stages are read
        at start: a cluster started before a stage was added needs a restart to have it)."""
        try:
            return f"name: {name}\n" in self.config_file.read_text()
        except OSError:
            return False

    def hold_pod(
        self,
        namespace: str,
        name: str,
        reason: str,
        message: str = "",
        last: tuple[int, str, str] | None = None,
        wait: bool = True,
        timeout: float = 30,
    ) -> dict | None:
        """Make a Running pod's containers wait with `reason` and `message` (the kubelet's words for
        an image it cannot pull, a missing Secret key, a crash loop); `last`: (exit code, reason,
        message) of the last termination, for CrashLoopBackOff."""
        self.wait_pod(namespace, name, _ready, "Running and Ready", timeout)
        annotations = {ANN_WAITING_REASON: reason, ANN_WAITING_MESSAGE: message}
        if last is not None:
            annotations.update({ANN_EXIT_CODE: str(last[0]), ANN_REASON: last[1], ANN_MESSAGE: last[2]})
        self._annotate(namespace, name, annotations)
        if not wait:
            return None
        return self.wait_pod(namespace, name, lambda p: _waiting_reason(p) == reason, f"waiting: {reason}", timeout)

    def evict_pod(self, namespace: str, name: str, grace_period_seconds: int | None = None) -> None:
        """The Eviction API (what `kubectl drain` and node-pressure/preemption tooling use): the API
        server adds the DisruptionTarget condition (reason EvictionByEvictionAPI) and deletes the
        pod; kwok then marks it Failed and removes it when its finalizers are gone."""
        body: dict[str, Any] = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        if grace_period_seconds is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": grace_period_seconds}
        status, resp = self.api("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", body)
        if status not in (200, 201):
            raise ClusterError(f"evicting pod {namespace}/{name}: {status} {resp}")

    @staticmethod
    def wait_for(fn: Callable[[], Any], what: str, timeout: float = 30, interval: float = 0.2) -> Any:
        """Poll fn until truthy and return that value; ClusterError naming `what` on timeout."""
        return wait_for(fn, timeout, what, interval)

    @staticmethod
    def condition(obj: dict, type_: str) -> dict | None:
        for c in obj.get("status", {}).get("conditions") or []:
            if c.get("type") == type_:
                return c
        return None

    def status_text(self) -> str:
        state = self._load_state()
        pids = self.component_pids()
        if not state and not pids:
            return f"down (no cluster in {self.cluster_dir})"
        alive = {n: _pid_alive(p) for n, p in pids.items()}
        if not any(alive.values()):
            return f"down (every component of {self.cluster_dir} has exited; `down` clears it)"
        if state:
            self.ports, self.server = state["ports"], state["server"]
        owner = (state or {}).get("owner_pid")
        lines = [
            f"{'up' if state and all(alive.values()) and self.healthy() else 'DEGRADED'}: {self.server or '?'}",
            f"KUBECONFIG={self.kubeconfig}",
            f"started by {'`harness.py up`' if owner is None else f'test session pid {owner}'}; "
            f"kwokctl cluster {CLUSTER_NAME!r} in {self.cluster_dir}; logs in {self.logs}",
        ]
        for n, pid in pids.items():
            lines.append(f"  {n:<24} pid {pid:<8} {'running' if alive[n] else 'DEAD'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "restart"])
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        c = LocalCluster()
        if args.command == "down":
            print("stopped" if c.stop_recorded() else "no cluster running")
            return 0
        if args.command == "status":
            print(c.status_text())
            return 0
        if args.command == "up":
            try:
                c.attach()
                print(f"already up: {c.server}\nexport KUBECONFIG={c.kubeconfig}")
                return 0
            except ClusterError:
                pass
        t0 = time.monotonic()
        c.start(die_with_parent=False)
        print(
            f"up in {time.monotonic() - t0:.1f} s: {c.server} (Kubernetes {c.versions['K8S_VERSION']}, "
            f"logs in {c.logs})\nexport KUBECONFIG={c.kubeconfig}"
        )
        return 0
    except ClusterError as e:
        print(f"harness: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
