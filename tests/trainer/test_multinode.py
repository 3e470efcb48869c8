"""Multi-node runs with an s3:// output: every node stages checkpoints on its own disk, so the nodes
publish one checkpoint together and each node fetches it once to resume.

The phased publish is checked against moto's S3 server (as in test_storage.py); then two real
torchrun "nodes" (`kubetune train` with NNODES=2 and NODE_RANK 0 and 1, as the operator starts its
pods, one process each) run on this machine, each with its own cache folder, HOME and
KUBETUNE_CACHE, so their local folders differ as two pods' do. Only the disk is per node here: the
network and the S3 server are shared, as in a cluster.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kubetune import storage
from kubetune.contract import EXIT_PREEMPTED, TrainerConfig
from kubetune.storage import COMPLETE_MARKER, StorageError, open_output
from kubetune_trainer.distributed import DistEnv
from tests.trainer.support import keys, make_config, make_folder, tree, write_config

pytestmark = [pytest.mark.trainer, pytest.mark.usefixtures("isolated_env")]

NAME = "checkpoints/step-00000002"
NODE0 = {"dcp/.metadata": b"m", "dcp/__0_0.distcp": b"0" * 3000, "rng-rank0.pt": b"r0", "scheduler.pt": b"s"}
NODE1 = {"dcp/__1_0.distcp": b"1" * 3000, "rng-rank1.pt": b"r1"}


def counting_downloads(monkeypatch) -> list:
    """Every folder download S3Output.fetch_dir starts, recorded."""
    calls, real = [], storage._s3_download_prefix
    monkeypatch.setattr(storage, "_s3_download_prefix", lambda *args: calls.append(args[3]) or real(*args))
    return calls


# --- the node and its local folder -------------------------------------------------------------


def test_dist_env_knows_the_node(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    alone = DistEnv.from_env()
    assert (alone.rank, alone.world_size, alone.node_rank) == (0, 1, 0)
    assert not alone.multi_node and alone.is_local_main
    assert not DistEnv(0, 2, 0).multi_node  # what tests and benchmarks build by hand: one node

    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    second_node = DistEnv.from_env()
    assert (second_node.node_rank, second_node.local_world_size, second_node.multi_node) == (1, 2, True)
    assert not second_node.is_local_main and not second_node.is_main
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not DistEnv.from_env().multi_node


def test_only_s3_stages_per_node(s3, pvc_root, tmp_path):
    _, bucket = s3
    assert open_output("pvc://data/out", cache_dir=tmp_path).local_dir_shared
    assert open_output((tmp_path / "out").as_uri(), cache_dir=tmp_path, local=True).local_dir_shared
    node0 = open_output(f"s3://{bucket}/out", cache_dir=tmp_path / "node0")
    node1 = open_output(f"s3://{bucket}/out", cache_dir=tmp_path / "node1")
    assert not node0.local_dir_shared and node0.local_dir() != node1.local_dir()


# --- the phased publish ------------------------------------------------------------------------


def test_two_nodes_publish_one_folder_atomically(s3, tmp_path, monkeypatch):
    client, bucket = s3
    uri = f"s3://{bucket}/runs/job"
    node0 = open_output(uri, cache_dir=tmp_path / "node0")
    node1 = open_output(uri, cache_dir=tmp_path / "node1")
    part0 = make_folder(node0.local_dir() / ".staging" / "step-00000002", NODE0)
    part1 = make_folder(node1.local_dir() / ".staging" / "step-00000002", NODE1)
    node0.publish_dir(make_folder(tmp_path / "earlier", {"stale.bin": b"x"}), NAME)  # an earlier try, complete
    assert node1.list_complete("checkpoints") == [NAME]

    node0.begin_dir(NAME)  # rank 0
    assert node1.list_complete("checkpoints") == [] and keys(client, bucket, f"runs/job/{NAME}/") == []
    files0 = node0.upload_part(part0, NAME)  # each node's first process
    assert node1.list_complete("checkpoints") == [], "marked before every node uploaded"
    with pytest.raises(StorageError, match=r"step-00000002: not marked complete, 2 files missing"):
        node0.finish_dir(NAME, files0 + ["dcp/__1_0.distcp", "rng-rank1.pt"])  # node 1's part never came
    assert node1.list_complete("checkpoints") == []
    with pytest.raises(StorageError, match="no complete folder"):
        node1.fetch_dir(NAME, tmp_path / "early")

    files1 = node1.upload_part(part1, NAME)
    assert node1.list_complete("checkpoints") == []
    assert node0.finish_dir(NAME, sorted(files0 + files1)) == f"{uri}/{NAME}"
    assert node1.list_complete("checkpoints") == [NAME]
    marker = json.loads(client.get_object(Bucket=bucket, Key=f"runs/job/{NAME}/{COMPLETE_MARKER}")["Body"].read())
    assert marker["files"] == len(NODE0) + len(NODE1) and marker["name"] == NAME

    downloads = counting_downloads(monkeypatch)
    dest = tmp_path / "node1" / "resume" / "step-00000002"
    assert node1.fetch_dir(NAME, dest) == dest and tree(dest) == {**NODE0, **NODE1}
    inode = (dest / "rng-rank1.pt").stat().st_ino
    assert node1.fetch_dir(NAME, dest) == dest and len(downloads) == 1, "a complete copy was downloaded again"
    assert (dest / "rng-rank1.pt").stat().st_ino == inode

    node0.publish_dir(part0, NAME)  # published again (another marker): the copy is stale
    assert tree(node1.fetch_dir(NAME, dest)) == NODE0 and len(downloads) == 2
    (dest.parent / f".{dest.name}.{COMPLETE_MARKER}").write_text("torn")  # a record that matches nothing
    node1.fetch_dir(NAME, dest)
    assert len(downloads) == 3 and tree(dest) == NODE0


def test_the_same_phases_on_a_shared_volume(pvc_root, tmp_path):
    out = open_output("pvc://data/out", cache_dir=tmp_path)
    out.publish_dir(make_folder(tmp_path / "earlier", {"stale.bin": b"x"}), NAME)
    out.begin_dir(NAME)
    assert out.list_complete("checkpoints") == []
    files = [
        *out.upload_part(make_folder(tmp_path / "p0", NODE0), NAME),
        *out.upload_part(make_folder(tmp_path / "p1", NODE1), NAME),
    ]
    assert out.list_complete("checkpoints") == []
    with pytest.raises(StorageError, match="1 files missing"):
        out.finish_dir(NAME, files + ["absent.pt"])
    out.finish_dir(NAME, files)
    assert out.list_complete("checkpoints") == [NAME]
    published = tree(out.fetch_dir(NAME, tmp_path / "unused"))
    assert json.loads(published.pop(COMPLETE_MARKER))["files"] == len(NODE0) + len(NODE1)
    assert published == {**NODE0, **NODE1}


# --- two real nodes ----------------------------------------------------------------------------


def node_config(tiny_model, tmp_path, node: int, uri: str, steps: int, every_save: int = 2):
    wire = make_config(tiny_model, tmp_path, steps=steps, every_save=every_save).to_wire()
    wire["spec"]["distributed"]["strategy"] = "fsdp"
    wire["spec"]["output"]["uri"] = uri
    wire["runtime"]["cacheDir"] = str(tmp_path / f"node{node}" / "cache")
    wire["runtime"]["terminationMessagePath"] = str(tmp_path / f"node{node}" / "termination-log")
    return write_config(TrainerConfig.model_validate(wire), tmp_path / f"node{node}" / "config.json")


def start_two_nodes(tiny_model, tmp_path, uri: str, steps: int, attempt: str, every_save: int = 2):
    """`kubetune train` as two pods of the job start it: NNODES=2, their NODE_RANK, the master's
    address; each with its own disk (cache folder, HOME, KUBETUNE_CACHE). Returns the two
    processes and the files their output goes to."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes, logs = [], []
    for node in (0, 1):
        home = tmp_path / f"node{node}"
        home.mkdir(exist_ok=True)
        config = node_config(tiny_model, tmp_path, node, uri, steps, every_save)
        env = {
            **os.environ,
            "NNODES": "2",
            "NODE_RANK": str(node),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "HOME": str(home),
            "KUBETUNE_CACHE": str(home / "kubetune"),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("KUBETUNE_LAUNCHED", None)
        log = home / f"{attempt}.log"
        logs.append(log)
        with open(log, "w") as out:
            command = [sys.executable, "-m", "kubetune", "train", "-f", str(config)]
            nodes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env))
    return nodes, logs


def run_two_nodes(tiny_model, tmp_path, uri: str, steps: int, attempt: str) -> list[str]:
    """Both nodes to the end; returns their stdouts."""
    nodes, logs = start_two_nodes(tiny_model, tmp_path, uri, steps, attempt)
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in texts)
    return texts


def events(text: str, kind: str) -> list[dict]:
    records = (json.loads(line) for line in text.splitlines() if line.startswith("{"))
    return [record for record in records if record.get("event") == kind]


SHARDED = [
    "_COMPLETE",
    "dcp/.metadata",
    "dcp/__0_0.distcp",
    "dcp/__1_0.distcp",
    "rng-rank0.pt",
    "rng-rank1.pt",
    "scheduler.pt",
    "strategy.json",
    "trainer_state.json",
]


def test_two_nodes_fsdp_checkpoint_every_shard_to_s3_and_resume(s3, tiny_model, tmp_path):
    client, bucket = s3
    uri = f"s3://{bucket}/jobs/multi"

    first = run_two_nodes(tiny_model, tmp_path, uri, steps=3, attempt="first")
    assert events(first[0], "plan")[0]["summary"].startswith("world size 2, strategy fsdp")
    assert [(e["step"], e["uri"]) for e in events(first[0], "checkpoint")] == [(2, f"{uri}/{NAME}")]
    prefix = f"jobs/multi/{NAME}/"
    assert [k[len(prefix) :] for k in keys(client, bucket, prefix)] == SHARDED, "a node's files are missing"
    marker = json.loads(client.get_object(Bucket=bucket, Key=prefix + COMPLETE_MARKER)["Body"].read())
    assert marker["files"] == len(SHARDED) - 1
    for node in (0, 1):  # each node staged in its own cache, and cleaned up after uploading
        staging = list((tmp_path / f"node{node}" / "cache" / "outputs").glob("*/.staging/step-00000002"))
        assert staging == [], staging

    # The job restarts (a new pod per node, same disks here): both nodes fetch the checkpoint into
    # their own cache and load their shard from it.
    second = run_two_nodes(tiny_model, tmp_path, uri, steps=5, attempt="second")
    for node, text in enumerate(second):
        assert [(e["checkpoint"], e["step"]) for e in events(text, "resumed")] == [(NAME, 2)], text[-2000:]
        fetched = tmp_path / f"node{node}" / "cache" / "resume" / "step-00000002"
        assert sorted(tree(fetched)) == SHARDED[1:]
    assert events(second[0], "done")[0]["steps"] == 5
    assert [e["step"] for e in events(second[0], "step")] == [3, 4, 5]
    newest = "jobs/multi/checkpoints/step-00000004/"
    assert [k[len(newest) :] for k in keys(client, bucket, newest)] == SHARDED
    reader = open_output(uri, cache_dir=tmp_path / "reader")
    assert reader.list_complete("checkpoints") == [NAME, "checkpoints/step-00000004"]


def test_preempting_one_node_stops_both_with_the_preemption_code(pvc_root, tiny_model, tmp_path):
    """Only the evicted pod gets SIGTERM. Its peer's workers stop with it after the same step and
    checkpoint together; torchrun reports 1 for them, but the launcher reports 143 (the Job's
    podFailurePolicy ignores it), so neither pod spends the Job's backoffLimit."""
    nodes, logs = start_two_nodes(tiny_model, tmp_path, "pvc://data/preempted", 5000, "run", every_save=10**6)
    try:
        deadline = time.monotonic() + 180
        while '"event": "step"' not in logs[0].read_text():  # rank 0 logs the steps
            assert time.monotonic() < deadline and nodes[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        nodes[1].send_signal(signal.SIGTERM)
        codes = [node.wait(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], "\n\n".join(text[-3000:] for text in texts)
    stopped = events(texts[0], "preempted")[0]["step"]
    assert [e["step"] for e in events(texts[0], "checkpoint")] == [stopped]
