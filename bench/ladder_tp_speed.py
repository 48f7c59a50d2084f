"""Decode speed of standard vs Ladder-residual blocks under tensor parallelism (kvtool.runtime.tp), random weights.

For each model shape and batch size this measures one decode step (B sequences x 1 token, static KV cache,
greedy next token fed back) in four variants on the same weights:

    standard          every attention/MLP all-reduce blocks the next module
    ladder            all layers ladder: each all-reduce is issued async and waited one module later
    standard/no-comm  all-reduces skipped: the compute-only time (outputs wrong; timing only)
    comm-only         just the 2L all-reduces of one step (B x 1 x hidden each), back to back

and reports tokens/s, the ladder speedup, and where the time goes: compute (no-comm), communication
(step - no-comm), the share of the communication the ladder schedule hides ((standard - ladder) /
(standard - no-comm)), and the weight-read bandwidth of the no-comm step against a measured device copy
bandwidth (the memory-bound ceiling of a decode step).

On CUDA each variant's step is captured in a CUDA graph (NCCL collectives inside the graph; falls back to
eager with a warning if capture fails) after warm-up, and timed with CUDA events over --steps replays
(median of --repeats runs, slowest rank). Before timing, a small Llama model checks that the TP decode
(standard, ladder, mixed; with the chosen add+RMSNorm) equals the single-process HF model.

Examples:
    torchrun --nproc-per-node 2 bench/ladder_tp_speed.py --device cuda --tp 2 --model 8b --batch 1,16
    torchrun --nproc-per-node 8 bench/ladder_tp_speed.py --device cuda --tp 8 --model 8b,70b --batch 1,16
    torchrun --nproc-per-node 2 bench/ladder_tp_speed.py --device cpu --quick      # gloo, tiny shapes
    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 bench/ladder_tp_speed.py --device cpu --quick --kernel triton
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1 shapes (gpt-fast's llama-3-8b / llama-3-70b)
    "8b": dict(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
               head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5),
    "70b": dict(num_layers=80, hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
                head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4,
                 head_dim=32, vocab_size=1000, rope_theta=10000.0, rms_norm_eps=1e-5),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tp", type=int, default=None, help="expected TP degree (= torchrun --nproc-per-node)")
    p.add_argument("--model", default="8b", help=f"comma list of shapes: {', '.join(SHAPES)}")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--hidden", type=int, default=None, help="override hidden size")
    p.add_argument("--intermediate", type=int, default=None, help="override MLP width")
    p.add_argument("--heads", type=int, default=None, help="override attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="override KV heads")
    p.add_argument("--head-dim", type=int, default=None, help="override head dim")
    p.add_argument("--vocab", type=int, default=None, help="override vocabulary size")
    p.add_argument("--batch", default="1,16", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens prefilled before decoding")
    p.add_argument("--cache-len", type=int, default=512, help="static KV cache length (attention spans it)")
    p.add_argument("--steps", type=int, default=100, help="decode steps timed per repeat")
    p.add_argument("--warmup", type=int, default=10, help="eager warm-up steps before capture/timing")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--no-graphs", action="store_true", help="time eager steps instead of CUDA graphs")
    p.add_argument("--kernel", default="torch", choices=["torch", "triton"],
                   help="add+RMSNorm: PyTorch ops or the fused Triton kernel (kvtool/kernels/ladder_norm.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the per-module compute (attention, MLP, add+norm; all-reduces stay between "
                        "them, as in the paper's semi-compiled model); falls back to eager if compilation fails")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check against HF")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps (CPU smoke test)")
    p.add_argument("--json", default=None, help="write results as JSON here (rank 0)")
    args = p.parse_args()
    if args.quick:  # tiny defaults; options given explicitly keep their values
        for key, value in (("model", "tiny"), ("batch", "1,4"), ("steps", 10), ("warmup", 2), ("repeats", 2),
                           ("prompt_len", 8), ("cache_len", 32)):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
        if args.device == "cpu":
            args.dtype = "float32"
    return args


def log(rank: int, *msg: Any) -> None:
    if rank == 0:
        print(*msg, flush=True)


def init(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp is not None and args.tp != world:
        sys.exit(f"error: --tp {args.tp} but {world} processes: launch with torchrun --nproc-per-node {args.tp}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but no GPU is visible: use --device cpu --quick")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1:
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def slowest(value: float, world: int, device: torch.device) -> float:
    """Max over ranks (the step is as slow as the slowest rank)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ------------------------------------------------------------------------------------------- correctness

def check_correctness(rank: int, world: int, device: torch.device, fused: bool) -> float:
    """TP decode (standard / ladder / mixed) vs the single-process HF model; returns the worst relative error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvtool  # noqa: F401
    from kvtool.runtime.ladder import install_ladder
    from kvtool.runtime.tp import TPDecoder

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=16, vocab_size=512, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.uniform_(0.5, 1.5)
    prompt = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    worst = 0.0
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for ladder in ([], [0, 1, 2, 3], [2, 3]):
            install_ladder(model, ladder)
            tp = TPDecoder.from_hf(model, rank, world, device=device, fused_norm=fused, max_len=16)
            tokens, logits = tp.greedy(prompt, steps=5)
            with torch.no_grad():
                ref = model(torch.cat([prompt, tokens], 1)).logits
            for s, lg in enumerate(logits):
                r = ref[:, prompt.shape[1] - 1 + s]
                worst = max(worst, ((lg - r).abs().max() / r.abs().max()).item())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return slowest(worst, world, device)


# ------------------------------------------------------------------------------------------------ timing

def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth (bytes read + written per second) of a 1 GiB (CPU: 64 MiB) buffer copy."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times[1:])


def time_fn(fn, steps: int, repeats: int, device: torch.device, world: int) -> float:
    """Median over repeats of the per-step time (ms) of ``fn`` run ``steps`` times, slowest rank."""
    results = []
    for _ in range(repeats):
        barrier(world)
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / steps
        else:
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            ms = (time.perf_counter() - t) * 1000 / steps
        results.append(slowest(ms, world, device))
    return statistics.median(results)


def make_runner(step, device: torch.device, graphs: bool, warmup: int, rank: int, label: str):
    """Warm up ``step`` and return (callable, used_graphs): a CUDA-graph replay when possible."""
    if device.type != "cuda" or not graphs:
        for _ in range(warmup):
            step()
        return step, False
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        torch.cuda.synchronize()
        return g.replay, True
    except Exception as exc:  # noqa: BLE001 — report and fall back to eager timing
        print(f"[rank {rank}] warning: CUDA graph capture failed for {label} ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); timing eager steps", flush=True)
        torch.cuda.synchronize()
        return step, False


def try_compile(tp, shape, rank: int, device: torch.device) -> bool:
    """Enable torch.compile on ``tp`` and run one small forward; on failure warn and stay eager."""
    tp.enable_compile()
    try:
        tp.setup_cache(1, 8)
        tp(torch.zeros(1, 2, dtype=torch.long, device=device), torch.arange(2, device=device))
        sync(device)
        return True
    except Exception as exc:  # noqa: BLE001 — report and fall back
        print(f"[rank {rank}] warning: torch.compile failed ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); timing eager modules", flush=True)
        tp.disable_compile()
        return False


def bench_shape(name: str, shape_kw: dict[str, Any], args: argparse.Namespace, rank: int, world: int,
                device: torch.device, copy_bw: float) -> list[dict[str, Any]]:
    from kvtool.models import ArchSpec
    from kvtool.runtime.tp import TPDecoder

    shape = ArchSpec(model_type="llama", qkv_bias=False, o_bias=False, rope_type="default", max_positions=131072,
                     **{"rope_theta": 500000.0, "qk_norm": False, **shape_kw})
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    tp = TPDecoder(shape, rank, world, None, dtype, device, fused_norm=args.kernel == "triton").random_init(seed=1)
    compiled = False
    if args.compile:
        compiled = try_compile(tp, shape, rank, device)
    sync(device)
    layer_bytes = sum(p.numel() * p.element_size() for n, p in tp.named_parameters() if n != "embed")
    log(rank, f"\n== {name}: {shape.num_layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, "
              f"heads {shape.num_heads}/{shape.num_kv_heads}, vocab {shape.vocab_size}, TP={world}, {args.dtype}; "
              f"weights read per step per rank {layer_bytes / 2**30:.2f} GiB "
              f"(built in {time.perf_counter() - t0:.0f} s)")
    rows = []
    all_layers = list(range(shape.num_layers))
    for batch in (int(b) for b in args.batch.split(",")):
        tp.setup_cache(batch, args.cache_len)
        gen = torch.Generator().manual_seed(2)
        prompt = torch.randint(0, shape.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
        tp(prompt, torch.arange(args.prompt_len, device=device))  # prefill (eager)
        tokens = torch.randint(0, shape.vocab_size, (batch, 1), generator=gen).to(device)
        pos = torch.tensor([args.prompt_len], device=device)

        def step(tp=tp, tokens=tokens, pos=pos):
            logits = tp(tokens, pos)
            tokens.copy_(logits[:, -1:].argmax(-1))

        res: dict[str, float] = {}
        used_graphs = {}
        for variant, ladder, comm in (("standard", [], True), ("ladder", all_layers, True),
                                      ("standard/no-comm", [], False), ("ladder/no-comm", all_layers, False)):
            tp.set_ladder(ladder)
            tp.comm = comm
            runner, used_graphs[variant] = make_runner(step, device, not args.no_graphs, args.warmup, rank,
                                                       f"{name} b={batch} {variant}")
            res[variant] = time_fn(runner, args.steps, args.repeats, device, world)
            del runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tp.comm = True
        # communication alone: the 2L all-reduces of one decode step
        bufs = [torch.zeros(batch, 1, shape.hidden_size, dtype=dtype, device=device) for _ in range(2)]

        def comm_step(bufs=bufs, n=2 * shape.num_layers):
            for k in range(n):
                if world > 1:
                    dist.all_reduce(bufs[k % 2])

        runner, _ = make_runner(comm_step, device, not args.no_graphs, args.warmup, rank, "comm-only")
        res["comm-only"] = time_fn(runner, args.steps, args.repeats, device, world)
        del runner
        std, lad, nocomm = res["standard"], res["ladder"], res["standard/no-comm"]
        comm_cost = std - nocomm
        row = {"model": name, "tp": world, "batch": batch, "dtype": args.dtype, "kernel": args.kernel,
               "compiled": compiled,
               "graphs": all(used_graphs.values()), "ms": res, "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu",
               "tokens_per_s": {k: batch * 1000 / v for k, v in res.items() if k != "comm-only"},
               "speedup": std / lad, "comm_share_of_standard": comm_cost / std,
               "hidden_fraction": (std - lad) / comm_cost if comm_cost > 0 else float("nan"),
               "weight_gib_per_rank": layer_bytes / 2**30,
               "nocomm_bandwidth_gbs": layer_bytes / (nocomm / 1000) / 1e9,
               "copy_bandwidth_gbs": copy_bw / 1e9,
               "ideal_ms_at_copy_bw": layer_bytes / (copy_bw / 2) * 1000}
        rows.append(row)
        log(rank, f"  batch {batch:>3}: standard {std:.3f} ms  ladder {lad:.3f} ms  no-comm {nocomm:.3f} ms  "
                  f"comm-only {res['comm-only']:.3f} ms  -> speedup {std / lad:.3f}x  "
                  f"(graphs: {row['graphs']})")
    del tp
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, check_err: float | None) -> None:
    print("\nLadder-residual decode benchmark (kvtool.runtime.tp, random weights, all layers ladder)")
    print(f"device: {rows[0]['device']}; dtype {args.dtype}; add+norm: {args.kernel}; "
          f"compiled: {all(r['compiled'] for r in rows)}; CUDA graphs: "
          f"{'no' if args.no_graphs or args.device == 'cpu' else 'yes'}; prompt {args.prompt_len}, KV cache "
          f"{args.cache_len}; {args.steps} steps x {args.repeats} repeats (median, slowest rank)")
    if check_err is not None:
        print(f"correctness: TP vs single-process HF logits, worst relative error {check_err:.2e}")
    head = (f"{'model':>5} {'TP':>3} {'batch':>5} | {'std tok/s':>10} {'ladder tok/s':>12} {'speedup':>8} | "
            f"{'std ms':>8} {'ladder ms':>9} {'no-comm ms':>10} {'comm-only ms':>12} | {'comm share':>10} "
            f"{'hidden':>7} | {'no-comm GB/s':>12} {'copy GB/s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms, tps = r["ms"], r["tokens_per_s"]
        print(f"{r['model']:>5} {r['tp']:>3} {r['batch']:>5} | {tps['standard']:>10.1f} {tps['ladder']:>12.1f} "
              f"{r['speedup']:>7.3f}x | {ms['standard']:>8.3f} {ms['ladder']:>9.3f} {ms['standard/no-comm']:>10.3f} "
              f"{ms['comm-only']:>12.3f} | {r['comm_share_of_standard']:>10.1%} {r['hidden_fraction']:>7.1%} | "
              f"{r['nocomm_bandwidth_gbs']:>12.1f} {r['copy_bandwidth_gbs']:>9.1f}")
    print("comm share = (standard - no-comm) / standard; hidden = (standard - ladder) / (standard - no-comm): "
          "the part of the communication time the ladder schedule removes from the step.")


def main() -> None:
    args = parse_args()
    rank, world, device = init(args)
    if args.kernel == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --kernel triton on the CPU needs TRITON_INTERPRET=1")
    try:
        check_err = None
        if not args.skip_check:
            check_err = check_correctness(rank, world, device, args.kernel == "triton")
            log(rank, f"correctness: TP={world} decode vs HF single process, worst relative logit error "
                      f"{check_err:.2e}")
            if check_err > 1e-3:
                raise SystemExit(f"error: TP output differs from the single-process model ({check_err:.2e})")
        copy_bw = copy_bandwidth(device)
        rows = []
        for name in args.model.split(","):
            if name not in SHAPES:
                raise SystemExit(f"error: unknown --model {name}: use {', '.join(SHAPES)}")
            kw = dict(SHAPES[name])
            for key, opt in (("num_layers", "layers"), ("hidden_size", "hidden"), ("intermediate_size",
                             "intermediate"), ("num_heads", "heads"), ("num_kv_heads", "kv_heads"),
                             ("head_dim", "head_dim"), ("vocab_size", "vocab")):
                if getattr(args, opt) is not None:
                    kw[key] = getattr(args, opt)
            rows += bench_shape(name, kw, args, rank, world, device, copy_bw)
        if rank == 0:
            print_table(rows, args, check_err)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "check_error": check_err, "rows": rows}, f, indent=2)
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
