"""`kvtool calibrate` of an 8B-shaped checkpoint on disk, whole model in host memory vs `--stream` (layers read from
disk one at a time): seconds, tokens/s, peak host RSS and peak GPU memory of each CLI run.

    python3 bench/gpu_calib_stream.py --tokenizer TOKENIZER_DIR [--samples 128 --seq-len 2048]
    python3 bench/gpu_calib_stream.py --tokenizer TOKENIZER_DIR --layers 16 --modes memory,memory+down_in,stream+down_in

A mode is `memory` or `stream`, optionally `+down_in` (the default statistics plus down_in, `--statistics
attn_in,q,k,v,o_in,mlp_in,down_in`: 1.9 GiB of float64 sums per layer, written into stats.safetensors (their upper
triangles: 0.95 GiB) as each layer
completes).

Writes a Llama-3-8B-shaped checkpoint with random bf16 weights (safetensors shards, 16 GB) and a text file of the
Python standard library's sources to --workdir, then runs the CLI as a user would, once per mode, each in its own
process: `kvtool calibrate DIR --device cuda --dataset TEXT --samples S --seq-len L -o OUT --json [--stream]`.
Peak RSS is the child's (wait4), peak GPU memory the largest `nvidia-smi` reading while it ran (the whole
process: the caching allocator's reservations and the CUDA context included). The tokenizer is SmolLM2's (ids below
the 8B vocabulary); the weights are random, so only speed and memory mean anything here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch


def write_checkpoint(directory: Path, tokenizer: Path, layers: int, hidden: int, inter: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                      head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(directory, max_shard_size="4GB")
    del model
    for f in tokenizer.iterdir():
        shutil.copy(f, directory / f.name)


def write_text(path: Path, chars: int) -> None:
    parts, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    path.write_text("\n".join(parts))


def gpu_used_mib() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return max(int(v) for v in out.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return -1


def run_cli(cmd: list[str]) -> dict:
    peak = [gpu_used_mib()]
    baseline = peak[0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], gpu_used_mib())
            time.sleep(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread.start()
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    result = json.loads(out)
    return {"wall_seconds": round(wall, 1), "collect_seconds": result.get("seconds"),
            "tokens_per_second": result.get("tokens_per_second"), "tokens": result.get("tokens"),
            "peak_gpu_mib_nvidia_smi": peak[0] - max(baseline, 0), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kvtool-stream-bench"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="memory,stream")
    args = ap.parse_args()
    for mode in args.modes.split(","):  # before the 16 GB checkpoint is written
        where, _, extra = mode.partition("+")
        if where not in ("memory", "stream") or extra not in ("", "down_in"):
            ap.error(f"unknown mode {mode!r}; use memory or stream, optionally +down_in")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, text = args.workdir / "model", args.workdir / "text.txt"
    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, args.tokenizer, args.layers, args.hidden, args.intermediate)
    if not text.exists():
        write_text(text, 12 * args.samples * args.seq_len)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    print(json.dumps({"checkpoint_gib": round(size, 2), "prepare_seconds": round(time.perf_counter() - t0, 1)}),
          flush=True)
    exe = shutil.which("kvtool", path=str(Path(sys.executable).parent)) or "kvtool"
    for mode in args.modes.split(","):
        out = args.workdir / f"stats-{mode.replace('+', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [exe, "calibrate", str(ckpt), "--device", args.device, "--dataset", str(text), "--samples",
               str(args.samples), "--seq-len", str(args.seq_len), "-o", str(out), "--json", "--no-progress"]
        where, _, extra = mode.partition("+")
        if where == "stream":
            cmd.append("--stream")
        if extra:
            cmd += ["--statistics", "attn_in,q,k,v,o_in,mlp_in,down_in"]
        row = {"mode": mode, **run_cli(cmd)}
        row["stats_gib"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**30, 2)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)  # the next mode's sums need the disk
    print(f"(commands: kvtool calibrate {ckpt} --device {args.device} --dataset {text} --samples {args.samples} "
          f"--seq-len {args.seq_len} -o OUT --json [--stream] [--statistics attn_in,q,k,v,o_in,mlp_in,down_in])")


if __name__ == "__main__":
    main()
