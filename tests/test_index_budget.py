"""The index chooser's default memory budget: the memory the machine (or its container) has."""

from __future__ import annotations

import numpy as np

from retrieval.index import choose_index_key, default_memory_budget, machine_memory_bytes, write_index

GiB = 2**30


def test_machine_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684096 kB\nMemFree:        1000 kB\n")
    unlimited = tmp_path / "memory.max"
    unlimited.write_text("max\n")
    assert machine_memory_bytes(meminfo, unlimited) == 24684096 * 1024
    limited = tmp_path / "limited.max"
    limited.write_text(str(8 * GiB) + "\n")
    assert machine_memory_bytes(meminfo, limited) == 8 * GiB  # a container gets less than the host
    assert machine_memory_bytes(meminfo, tmp_path / "absent") == 24684096 * 1024
    found = machine_memory_bytes()
    assert found is not None and found > 0 and default_memory_budget() == found


def test_the_default_budget_keeps_huge_collections_off_hnsw():
    # 50M x 384: HNSW32 needs ~90 GB; unlimited it is chosen, on a 24 GB machine it must not be
    assert choose_index_key(50_000_000, 384, None) == "HNSW32"
    assert "PQ" in choose_index_key(50_000_000, 384, 24 * GiB)
    budget = machine_memory_bytes()
    assert budget is not None
    if budget < 50_000_000 * (4 * 384 + 8 * 32 + 16):
        assert "PQ" in choose_index_key(50_000_000, 384, budget)


def test_write_index_records_the_default_budget(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = write_index(tmp_path / "idx", x, [{"id": f"i{i}"} for i in range(20)], encoder_identity={"m": 1},
                    encoder_label="t")
    assert m.index_key == "Flat" and m.build["memory_budget_bytes"] == machine_memory_bytes()
