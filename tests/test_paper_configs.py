"""bench/configs/paper/: every scheme, IID and Dirichlet(0.5), full and small scale; each file
is valid for the rank count its header gives, and runs of one setup share one workload."""

from __future__ import annotations

import re
from collections import defaultdict

from conftest import REPO
from snake_mpi.config import load_config, to_toml
from snake_mpi.schemes.rules import data_ranks, validate_for_world

PAPER = REPO / "bench" / "configs" / "paper"
SCHEMES = ["snake-p2p", "snake-cs", "fedavg", "split", "splitfed", "centralised"]


def test_every_scheme_partition_and_scale_is_there_and_valid():
    files = sorted(PAPER.glob("*.toml"))
    expected = {
        f"{s}-{p}{suffix}.toml"
        for s in SCHEMES
        for p in ("iid", "dir0.5")
        for suffix in ("", "-small")
    }
    assert {f.name for f in files} == expected
    workloads = defaultdict(set)
    for f in files:
        n = int(re.search(r"mpirun -n (\d+)", f.read_text()).group(1))
        cfg = load_config(f)
        validate_for_world(cfg, n)
        assert cfg.model.family == "vgg11" and cfg.data.name == "cifar10" and cfg.data.augment
        holders = len(data_ranks(cfg, n))
        assert holders == (1 if cfg.scheme == "centralised" else 4), f.name
        assert cfg.data.partition == ("iid" if "-iid" in f.name else "dirichlet")
        key = (cfg.data.partition, f.name.endswith("-small.toml"))
        workloads[key].add(to_toml(cfg.model) + to_toml(cfg.data))
        if f.name.endswith("-small.toml"):
            assert cfg.model.width == 8 and cfg.data.n_train <= 10000
        else:
            assert cfg.model.width == 64 and cfg.data.n_train == 50000
    assert all(len(w) == 1 for w in workloads.values())  # comparable within each setup
