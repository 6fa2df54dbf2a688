import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small built-in-style data set in the COCO layout (60 train, 8 val images)."""
    from dtrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic(out, train_images=60, val_images=8, seed=3)
    return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """The session's local Slurm cluster (tests/local_cluster.py): namespace hosts
    node1..node3 where namespaces can be made, else one node on localhost. Started
    once, always stopped (fixture teardown, and atexit for an interrupted session)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    import local_cluster

    local_cluster.ensure_slurm_installed()
    no_hosts = local_cluster.namespaces_unavailable()
    nodes = 1 if no_hosts else local_cluster.HOSTS
    # Not under pytest's private (mode 700) tmp dirs: munged wants every directory
    # above its socket executable by all.
    parent = Path(tempfile.gettempdir())
    local_cluster.stop_abandoned(parent)  # left by sessions that were killed
    root = Path(tempfile.mkdtemp(prefix="dtrain-slurm-", dir=parent))
    root.chmod(0o755)
    (root / "owner.pid").write_text(str(os.getpid()))
    cluster = local_cluster.Cluster(root, nodes, no_hosts)
    atexit.register(cluster.stop)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """The built-in data set, small: `python -m dtrain data synth`."""
    import subprocess

    out = tmp_path_factory.mktemp("synth")
    cmd = [sys.executable, "-m", "dtrain", "data", "synth", "--out", str(out)]
    cmd += ["--train-images", "400", "--val-images", "50"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out
