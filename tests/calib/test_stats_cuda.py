"""The GPU paths of the statistics store (run where CUDA is present: on the device machine, not in CI): each
layer's sums leave the GPU through pinned buffers on a copy stream, and with ``write_to`` only their packed upper
triangles travel and are written."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_sums_written_layer_by_layer_equal_the_in_memory_sums(tmp_path, monkeypatch):
    from conftest import tiny_model

    import kvtool.calib.stats as stats_module
    from kvtool.calib.collect import collect_statistics
    from kvtool.calib.stats import StatsStore
    from kvtool.models import wrap_model

    monkeypatch.setattr(stats_module, "WIDE_GRAM_BLOCK", 16)  # the tiny model's wide sums take the blocked path
    loaded = wrap_model(tiny_model("llama", seed=5).to("cuda", torch.bfloat16))
    windows = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(6))
    names = "attn_in,q,k,v,o_in,mlp_in,down_in"
    meta = {"model": {"hash": "sha256:tiny"}}
    in_memory = collect_statistics(loaded, windows, names, device="cuda", batch_size=4)
    in_memory.meta = meta
    assert in_memory._upper == {} and all(not t.is_cuda for t in in_memory.sums.values())
    files = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        streamed = collect_statistics(loaded, windows, names, device="cuda", batch_size=4, write_to=tmp_path / name)
        assert streamed.sums == {}
        streamed.meta = meta
        streamed.save(tmp_path / name)
        files.append((tmp_path / name / "stats.safetensors").read_bytes())
    assert files[0] == files[1]
    back = StatsStore.load(tmp_path / "a")
    for (i, n), ref in in_memory.sums.items():
        assert torch.equal(ref, ref.mT), (i, n)
        assert torch.equal(back.sum(i, n), ref), (i, n)
        assert back.count(i, n) == in_memory.count(i, n) == 6 * 32
