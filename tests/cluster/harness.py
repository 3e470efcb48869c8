#!/usr/bin/env python3
"""A real Kubernetes control plane for tests, from locally built binaries, started in seconds.

    python3 tests/cluster/harness.py up       # start (or report the running one); prints KUBECONFIG
    python3 tests/cluster/harness.py status   # is it up? which ports, pids
    python3 tests/cluster/harness.py down     # kill every process it started (its process group)

What runs: etcd, kube-apiserver (RBAC,Node; client-cert auth), kube-controller-manager
(--controllers=*: Jobs make pods, garbage collection, namespaces, service accounts, ...),
kube-scheduler and kwok, which plays the kubelet for fake nodes (annotation kwok.x-k8s.io/node=fake):
two 8-GPU nodes (tainted nvidia.com/gpu=present:NoSchedule, zones zone-a / zone-b) and one CPU node.

Pods on the fake nodes go Running on their own and stay Running until a test decides how they end:

* ``succeed_pod`` / ``fail_pod`` (or the annotations ``ANN_RESULT`` = Succeeded|Failed with optional
  ``ANN_RESULT_AFTER`` e.g. "2s", ``ANN_EXIT_CODE``, ``ANN_REASON``, ``ANN_MESSAGE``, set on a pod or
  on a Job's pod template) - kwok stages below then terminate the containers and set the phase.
* ``evict_pod`` - the Eviction API: the API server adds the DisruptionTarget condition and deletes
  the pod; kwok then plays the kubelet (containers killed, phase Failed) and removes the pod once its
  finalizers (e.g. the Job controller's) are gone.

Binaries come from ``bash scripts/k8s-build.sh`` (versions in scripts/k8s-versions.env). Standard
library + the ``openssl`` command only. Everything lives in ``.cache/cluster/`` (kubeconfig,
pki, etcd data, logs/*.log, state.json); ``up`` starts from an empty etcd every time.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import secrets
import shutil
import signal
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
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"

# Annotations the kwok stages of this harness react to (on a pod, or on a Job's pod template).
ANN_RESULT = "kubetune.test/pod-result"  # "Succeeded" | "Failed"
ANN_RESULT_AFTER = "kubetune.test/pod-result-after"  # Go duration, e.g. "2s" (default: at once)
ANN_EXIT_CODE = "kubetune.test/exit-code"  # Failed only; default 1
ANN_REASON = "kubetune.test/reason"  # Failed only; default "Error"
ANN_MESSAGE = "kubetune.test/message"  # Failed only; default "container failed"

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
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
    ):
        text = text.replace(f'"{name}"', f'"{value}"')
    return text


# ------------------------------------------------------------------------------------------------
# Helpers.


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
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def _pid_alive(pid: int, starttime: str | None) -> bool:
    st = _proc_starttime(pid)
    if st is None or (starttime is not None and st != starttime):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pgid: int | None, procs: list[tuple[int, str | None]], reap: Iterable = ()) -> None:
    """SIGTERM (10 s grace), then SIGKILL: the process group pgid, if one of procs (pid, starttime:
    verified against /proc so a recycled pid is never hit) still leads or is in it, and each of procs."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        alive = [pid for pid, st in procs if _pid_alive(pid, st)]
        if not alive:
            return
        group_ok = False
        for pid in alive:
            try:
                group_ok = group_ok or (pgid is not None and os.getpgid(pid) == pgid)
            except ProcessLookupError:
                pass
        if group_ok:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for p in reap:
                p.poll()  # reap our own children so they do not linger as zombies
            if not any(_pid_alive(pid, st) for pid, st in procs):
                return
            time.sleep(0.05)


def _die_with_parent() -> None:  # preexec_fn: SIGKILL the child if the starting process dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[serving]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = @san
[san]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = {service_ip}
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""


def generate_pki(pki: Path) -> None:
    """CA, apiserver serving cert, admin client cert (system:masters), service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "openssl.cnf").write_text(_OPENSSL_CNF.format(service_ip=SERVICE_IP))

    def key(name: str) -> None:
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=pki)

    def leaf(name: str, subj: str, ext: str) -> None:
        key(f"{name}.key")
        _openssl(
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-key",
            f"{name}.key",
            "-subj",
            subj,
            "-out",
            f"{name}.csr",
            cwd=pki,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x" + secrets.token_hex(16),
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            ext,
            "-out",
            f"{name}.crt",
            cwd=pki,
        )
        (pki / f"{name}.csr").unlink()

    key("ca.key")
    _openssl(
        "req",
        "-x509",
        "-new",
        "-config",
        "openssl.cnf",
        "-key",
        "ca.key",
        "-subj",
        "/CN=kubetune-test-ca",
        "-days",
        "3650",
        "-sha256",
        "-extensions",
        "ca",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    leaf("apiserver", "/CN=kube-apiserver", "serving")
    leaf("admin", "/O=system:masters/CN=kubetune-admin", "client")
    key("sa.key")
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "kubetune-test", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}
        ],
        "users": [
            {
                "name": "kubetune-admin",
                "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")},
            }
        ],
        "contexts": [
            {
                "name": "kubetune-test",
                "context": {"cluster": "kubetune-test", "user": "kubetune-admin", "namespace": "default"},
            }
        ],
        "current-context": "kubetune-test",
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2))  # JSON is YAML
    tmp.chmod(0o600)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on 127.0.0.1.

    ``LocalCluster().start()`` (or ``with LocalCluster() as c:``) brings it up; ``stop()`` kills the
    whole process group. ``attach()`` adopts one already started by ``harness.py up``.
    """

    ANN_RESULT = ANN_RESULT
    ANN_RESULT_AFTER = ANN_RESULT_AFTER
    ANN_EXIT_CODE = ANN_EXIT_CODE
    ANN_REASON = ANN_REASON
    ANN_MESSAGE = ANN_MESSAGE
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
        self.pki = self.data_dir / "pki"
        self.logs = self.data_dir / "logs"
        self.state_file = self.data_dir / "state.json"
        self.nodes = nodes if nodes is not None else default_nodes()
        self.versions = read_versions()
        self.ports: dict[str, int] = {}
        self.pgid: int | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._state: dict[str, Any] = {}
        self._ssl: ssl.SSLContext | None = None
        self.server = ""
        self.started_here = False

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90, die_with_parent: bool = True) -> LocalCluster:
        """Start from scratch (an earlier cluster of this data dir is stopped first).

        die_with_parent: the components get SIGKILL when this process dies (for test sessions;
        the CLI's `up` passes False so they outlive it). A component that exits during startup
        (say a free port taken meanwhile by another process) gets one more attempt."""
        try:
            return self._start(timeout, die_with_parent)
        except ClusterError as e:
            if "exited with" not in str(e):
                raise
            print(f"harness: {e}; starting again", file=sys.stderr)
            return self._start(timeout, die_with_parent)

    def _start(self, timeout: float, die_with_parent: bool) -> LocalCluster:
        t0 = time.monotonic()
        self.pgid = None
        self.stop_recorded()
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.logs.mkdir(parents=True)
        generate_pki(self.pki)
        self.ports = {
            name: free_port() for name in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler")
        }
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        write_kubeconfig(self.kubeconfig, self.server, self.pki)
        (self.data_dir / "kwok-stages.yaml").write_text(kwok_pod_stages())
        self.started_here = True
        try:
            commands = self._commands()
            # etcd + apiserver first; the rest once it serves (kwok's and the controllers' own
            # retry back-off would otherwise add seconds).
            for name, argv in commands[:2]:
                self._spawn(name, argv, die_with_parent)
            self._save_state()
            self._wait_ready(t0, timeout, lambda: [self._spawn(n, a, die_with_parent) for n, a in commands[2:]])
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        self._state["ready_s"] = round(time.monotonic() - t0, 1)
        self._save_state()
        return self

    def attach(self) -> LocalCluster:
        """Adopt the cluster recorded in state.json (started by `harness.py up`), if healthy."""
        state = self._load_state()
        if not state or not self._recorded_alive(state):
            raise ClusterError(f"no running cluster recorded in {self.state_file}")
        self._state = state
        self.ports = state["ports"]
        self.pgid = state["pgid"]
        self.server = state["server"]
        self.started_here = False
        if not self.healthy():
            raise ClusterError("the recorded cluster is running but not healthy")
        return self

    def stop(self) -> None:
        """Kill every process this cluster started (SIGTERM to the process group, then SIGKILL)."""
        self.stop_recorded()
        live = [p.pid for p in self._procs.values() if p.poll() is None]
        if live:  # started here but state.json not (yet) written
            _terminate(self.pgid, [(pid, None) for pid in live], reap=self._procs.values())
        for p in self._procs.values():
            p.wait()
        self._procs.clear()

    def stop_recorded(self) -> bool:
        """Stop the cluster recorded in state.json, if any; True if there was one."""
        state = self._load_state()
        if not state:
            return False
        procs = [(p["pid"], p["starttime"]) for p in state.get("processes", {}).values()]
        _terminate(state.get("pgid"), procs, reap=self._procs.values())
        self.state_file.unlink(missing_ok=True)
        return True

    def healthy(self) -> bool:
        try:
            status, _ = self.api("GET", "/readyz")
            return status == 200
        except Exception:  # noqa: BLE001
            return False

    def _recorded_alive(self, state: dict) -> bool:
        return all(_pid_alive(p["pid"], p["starttime"]) for p in state.get("processes", {}).values())

    # -- processes -------------------------------------------------------------------------------

    def _commands(self) -> list[tuple[str, list[str]]]:
        b, d, pki, p = self.bin_dir, self.data_dir, self.pki, self.ports
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd_peer']}"
        kc = str(self.kubeconfig)
        return [
            (
                "etcd",
                [
                    str(b / "etcd"),
                    "--name=kubetune",
                    f"--data-dir={d / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=kubetune={peer_url}",
                    "--initial-cluster-state=new",
                    "--unsafe-no-fsync=true",
                    "--log-level=warn",
                ],
            ),
            (
                "kube-apiserver",
                [
                    str(b / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={p['apiserver']}",
                    "--advertise-address=127.0.0.1",
                    "--endpoint-reconciler-type=none",
                    f"--cert-dir={d / 'apiserver'}",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    # Front-proxy auth nobody can use (no cert has that CN); set so the delegated
                    # authentication of the controller-manager and scheduler does not log errors.
                    f"--requestheader-client-ca-file={pki / 'ca.crt'}",
                    "--requestheader-allowed-names=kubetune-front-proxy-unused",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=Node,RBAC",
                    "--allow-privileged=true",
                    "--enable-priority-and-fairness=false",
                    "--profiling=false",
                ],
            ),
            (
                "kube-controller-manager",
                [
                    str(b / "kube-controller-manager"),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={p['controller_manager']}",
                    f"--cert-dir={d / 'controller-manager'}",
                    "--leader-elect=false",
                    "--controllers=*",
                    "--use-service-account-credentials=false",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                    f"--cluster-signing-key-file={pki / 'ca.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--kube-api-qps=200",
                    "--kube-api-burst=400",
                    "--profiling=false",
                ],
            ),
            (
                "kube-scheduler",
                [
                    str(b / "kube-scheduler"),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={p['scheduler']}",
                    f"--cert-dir={d / 'scheduler'}",
                    "--leader-elect=false",
                    "--profiling=false",
                ],
            ),
            (
                "kwok",
                [
                    str(b / "kwok"),
                    f"--kubeconfig={kc}",
                    f"--config={d / 'kwok-stages.yaml'}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                    "--node-lease-duration-seconds=40",
                    "--cidr=10.244.0.0/16",
                    "--node-ip=10.0.0.1",
                ],
            ),
        ]

    def _spawn(self, name: str, argv: list[str], die_with_parent: bool) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ, HOME=str(self.data_dir / "home"))  # kwok reads ~/.kwok
        (self.data_dir / "home").mkdir(exist_ok=True)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                process_group=0 if self.pgid is None else self.pgid,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        finally:
            log.close()
        if self.pgid is None:
            self.pgid = proc.pid
        self._procs[name] = proc

    def _save_state(self) -> None:
        self._state.update(
            {
                "pgid": self.pgid,
                "server": self.server,
                "kubeconfig": str(self.kubeconfig),
                "ports": self.ports,
                "bin_dir": str(self.bin_dir),
                "owner_pid": os.getpid(),
                "processes": {n: {"pid": p.pid, "starttime": _proc_starttime(p.pid)} for n, p in self._procs.items()},
            }
        )
        self.state_file.write_text(json.dumps(self._state, indent=2))

    def _load_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _check_processes(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise ClusterError(f"{name} exited with {p.returncode}; see {self.logs / (name + '.log')}")

    def dump_logs(self, lines: int = 15, out=sys.stderr) -> None:
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {log} (last {len(tail)} lines)", file=out)
            for line in tail:
                print(f"  {line}", file=out)

    # -- readiness -------------------------------------------------------------------------------

    def _wait_ready(self, t0: float, timeout: float, start_rest: Callable[[], Any]) -> None:
        def remaining() -> float:
            return max(1.0, timeout - (time.monotonic() - t0))

        def apiserver_ready() -> bool:
            self._check_processes()
            return self.healthy()

        wait_for(apiserver_ready, remaining(), "kube-apiserver /readyz", interval=0.1)
        start_rest()
        self._save_state()
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
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; CompletedProcess with text stdout/stderr.

        check=True raises ClusterError (with stderr) on a non-zero exit."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), KUBECACHEDIR=str(self.data_dir / "kubectl-cache"))
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
        if not state:
            return f"down (no {self.state_file})"
        alive = {n: _pid_alive(p["pid"], p["starttime"]) for n, p in state["processes"].items()}
        if not any(alive.values()):
            return f"down (every process recorded in {self.state_file} has exited; `down` clears it)"
        self.ports, self.server = state["ports"], state["server"]
        lines = [
            f"{'up' if all(alive.values()) and self.healthy() else 'DEGRADED'}: {state['server']}",
            f"KUBECONFIG={state['kubeconfig']}",
            f"process group {state['pgid']}; logs in {self.logs}",
        ]
        for n, p in state["processes"].items():
            lines.append(f"  {n:<24} pid {p['pid']:<8} {'running' if alive[n] else 'DEAD'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "restart"])
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "down":
            # Needs no binaries: it only reads state.json.
            c = LocalCluster.__new__(LocalCluster)
            c.data_dir, c.state_file, c._procs = DATA_DIR, DATA_DIR / "state.json", {}
            print("stopped" if c.stop_recorded() else "no cluster running")
            return 0
        c = LocalCluster()
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
