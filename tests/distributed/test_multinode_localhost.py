"""Two torchrun "nodes" on one machine form one world of two and train the bundle together.

Each node is its own torchrun agent (``--nnodes 2 --nproc_per_node 1``), as on a real two-machine job, meeting
through the c10d rendezvous at ``127.0.0.1:PORT``. Both agents see a loopback endpoint, so both try to host the
rendezvous TCPStore; the second fails to bind the port and joins as a client (torch does this by design). Ranks
come from the rendezvous (on one host: the lower agent PID is rank 0), not from ``--node_rank``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from volcnn.data import synthesize_cohort

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
SMALL = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "amp": False,
         "progress": False, "device": "cpu"}  # fmt: skip
TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the rendezvous endpoint must not be in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_command(cohort: Path, out: Path, port: int, run_id: str, epochs: int) -> list[str]:
    """One node's torchrun agent: 1 local process in a 2-node job, c10d rendezvous on the loopback address."""
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
           "--rdzv_conf", "join_timeout=60", "--local_addr", "127.0.0.1",
           "-m", "monai.bundle", "run", "training", "--config_file", configs,
           "--dataset_dir", str(cohort), "--datalist", str(cohort / "datalist.json"), "--output_dir", str(out),
           "--max_epochs", str(epochs)]  # fmt: skip
    for key, value in SMALL.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return cmd


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


@pytest.fixture(scope="module")
def two_nodes(cohort, tmp_path_factory) -> tuple[Path, list[str]]:
    """Start both node agents, wait for both; the run folder and each agent's log (stdout and stderr)."""
    root = tmp_path_factory.mktemp("multinode")
    out = root / "run"
    cmd = node_command(cohort, out, free_port(), f"volcnn-test-{uuid.uuid4().hex[:8]}", epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"}
    logs = [root / f"node{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as f:  # a new session each, so a hung agent and its worker can be ended together
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n\n".join(f"node {i}:\n{t[-3000:]}" for i, t in enumerate(texts))
    return out, texts


def test_the_two_agents_form_one_world_of_two(two_nodes):
    """Each agent's rendezvous result (torchrun's INFO log): one is group rank 0, the other 1, in a world of 2."""
    _, texts = two_nodes
    ranks = sorted(line.split("group_rank=")[1].strip() for t in texts for line in t.splitlines()
                   if "group_rank=" in line)  # fmt: skip
    assert ranks == ["0", "1"]
    assert all("global_world_sizes=[2]" in t for t in texts)


def test_training_ran_data_parallel_over_both_nodes(cohort, two_nodes):
    """Rank 0's checkpoint: an epoch is half the single-process one (each rank trains on its half of the
    training set) and holds the random state of two ranks; one run folder, one set of checkpoints."""
    out, _ = two_nodes
    training = json.loads((cohort / "datalist.json").read_text())["training"]
    batch = SMALL["batch_size"]
    single = len(training) // batch  # one process: drop_last over the whole set
    per_rank = math.ceil(len(training) / 2) // batch  # shard padded to an even split
    assert per_rank < single
    ckpt = torch.load(out / "models" / "checkpoint_epoch0001.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["epoch_length"] == per_rank
    assert ckpt["trainer"]["iteration"] == per_rank
    assert len(ckpt["rng_ranks"]) == 2
    assert sorted(p.name for p in (out / "models").glob("checkpoint_epoch*.pt")) == ["checkpoint_epoch0001.pt"]
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)
