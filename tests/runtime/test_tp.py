"""Tensor parallelism over 2 gloo processes: TP logits equal the single-process model, standard and ladder blocks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

from kvtool.errors import KvtoolError
from kvtool.models import ArchSpec
from kvtool.runtime.ladder import install_ladder
from kvtool.runtime.tp import TPDecoder, describe_schedule

CASES = [("llama", []), ("llama", [0, 1, 2]), ("llama", [1, 2]), ("qwen2", [0, 2]), ("qwen3", [0, 1, 2])]


class _Recorder:
    """Wraps dist.all_reduce to log issue/wait order: ('issue', n, async) and ('wait', n)."""

    def __init__(self):
        self.log: list[tuple] = []
        self.real = dist.all_reduce

    def __call__(self, tensor, *args, async_op=False, **kwargs):
        n = sum(1 for e in self.log if e[0] == "issue")
        self.log.append(("issue", n, bool(async_op)))
        work = self.real(tensor, *args, async_op=async_op, **kwargs)
        if not async_op:
            return work
        log = self.log

        class _Work:
            def wait(self_inner):
                log.append(("wait", n))
                return work.wait()
        return _Work()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = []
        for arch, ladder in CASES:
            model = tiny_model(arch, seed=5)
            install_ladder(model, ladder)
            prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
            tp = TPDecoder.from_hf(model, rank, world, max_len=16)
            tp.setup_cache(2, 16)
            rec = _Recorder()
            dist.all_reduce = rec
            try:  # the all-reduce schedule of one forward (the prefill)
                tp(prompt, torch.arange(prompt.shape[1]))
            finally:
                dist.all_reduce = rec.real
            tokens, logits = tp.greedy(prompt, steps=4)
            # single-process reference: the HF model (ladder class installed) on the whole sequence, no cache
            seq = torch.cat([prompt, tokens], dim=1)
            ref = model(seq).logits
            ref_steps = [ref[:, prompt.shape[1] - 1 + s] for s in range(len(logits))]
            err = max((a - b).abs().max().item() for a, b in zip(logits, ref_steps, strict=True))
            results.append({"arch": arch, "ladder": ladder, "err": err, "log": rec.log,
                            "scale": ref.abs().max().item(),
                            "tokens_equal": bool(torch.equal(tokens, ref[:, prompt.shape[1] - 1:-1].argmax(-1)))})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    out = tmp / "results.json"
    mp.start_processes(_worker, args=(2, str(tmp / "init"), str(out)), nprocs=2, join=True, start_method="spawn")
    return json.loads(out.read_text())


def test_tp2_equals_single_process(tp_results):
    assert len(tp_results) == len(CASES)
    for r in tp_results:
        assert r["err"] < 2e-5 * max(1.0, r["scale"]), r
        assert r["tokens_equal"], r


def test_ladder_allreduce_is_async_and_waited_one_module_later(tp_results):
    by = {(r["arch"], tuple(r["ladder"])): r for r in tp_results}
    std = by[("llama", ())]["log"]
    issues = [e for e in std if e[0] == "issue"]
    assert issues and all(not e[2] for e in issues) and not any(e[0] == "wait" for e in std)
    lad = by[("llama", (0, 1, 2))]["log"]
    issued = [e for e in lad if e[0] == "issue"]
    # 6 modules: all but the last all-reduce (followed by the final norm) are asynchronous
    assert [e[2] for e in issued] == [True, True, True, True, True, False]
    pos = {(e[0], e[1]): k for k, e in enumerate(lad)}
    for n in range(4):  # all-reduce n is waited after all-reduce n+1 was issued (module n+1 ran meanwhile)
        assert pos[("issue", n + 1)] < pos[("wait", n)] < pos[("issue", n + 2)]


def test_schedule_counts_and_bad_split():
    assert describe_schedule([], 4) == {"allreduces": 8, "overlapped": 0, "blocking": 8}
    assert describe_schedule([0, 1, 2, 3], 4)["overlapped"] == 7
    assert describe_schedule([2, 3], 4)["overlapped"] == 4  # layer 1's MLP + layers 2, 3 (minus the last)
    with pytest.raises(KvtoolError, match="do not split over 3 ranks"):
        spec = ArchSpec("llama", 2, 64, 96, 4, 2, 16, 100, False, False, False, 10000.0, "default", 256)
        TPDecoder(spec, rank=0, world=3)


def test_world1_fused_kernel_equals_hf_ladder():
    model = tiny_model("llama", seed=2)
    install_ladder(model, [1, 2])
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    for fused in (False, True):
        tp = TPDecoder.from_hf(model, fused_norm=fused, max_len=8)
        tp.setup_cache(2, 8)
        torch.testing.assert_close(tp(ids, torch.arange(6)), ref, rtol=1e-5, atol=1e-5)
