"""Two gloo processes on the CPU give the same statistics as one process (summed onto rank 0 layer by layer)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

from kvtool.calib.collect import collect_statistics
from kvtool.calib.stats import StatsStore
from kvtool.models import wrap_model


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ids = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(7))
        loaded = wrap_model(tiny_model("qwen3", seed=11))
        store = collect_statistics(loaded, ids, "attn_in,q,k,v,o_in", batch_size=2)
        store.meta = {"model": loaded.identity()}
        if rank != 0:  # each layer's sums went to rank 0 as the layer completed; this rank keeps the counts
            assert not store.sums and store.counts[(0, "attn_in")] == 6 * 20
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            store.save(out_dir)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    out = tmp_path / "stats"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    merged = StatsStore.load(out)
    ids = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(7))
    single = collect_statistics(wrap_model(tiny_model("qwen3", seed=11)), ids, "attn_in,q,k,v,o_in", batch_size=2)
    assert sorted(merged.sums) == sorted(single.sums)
    for key, ref in single.sums.items():
        torch.testing.assert_close(merged.sums[key], ref, rtol=1e-10, atol=1e-10)
        assert merged.counts[key] == single.counts[key] == 6 * 20
