"""StatsStore persistence, merging and validation."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from kvtool.calib.stats import StatsStore, parse_stats
from kvtool.errors import KvtoolError


def make_store(seed=0, rows=10):
    g = torch.Generator().manual_seed(seed)
    store = StatsStore({"model": {"hash": "sha256:abc"}})
    for layer in range(2):
        store.add(layer, "attn_in", torch.randn(rows, 8, generator=g))
    return store


def test_add_accumulates_float64_gram():
    x = torch.randn(7, 5, dtype=torch.float32)
    store = StatsStore()
    store.add(0, "attn_in", x[:3])
    store.add(0, "attn_in", x[3:])
    torch.testing.assert_close(store.sum(0, "attn_in"), x.double().T @ x.double())
    assert store.count(0, "attn_in") == 7
    torch.testing.assert_close(store.second_moment(0, "attn_in"), x.double().T @ x.double() / 7)


def test_save_load_roundtrip(tmp_path):
    store = make_store()
    store.save(tmp_path)
    back = StatsStore.load(tmp_path)
    assert back.meta["model"]["hash"] == "sha256:abc"
    for key in store.sums:
        assert torch.equal(back.sums[key], store.sums[key])
        assert back.counts[key] == store.counts[key]


def test_merge_adds_sums_and_counts():
    a, b = make_store(0), make_store(1, rows=4)
    expected = a.sums[(0, "attn_in")] + b.sums[(0, "attn_in")]
    a.merge(b)
    torch.testing.assert_close(a.sums[(0, "attn_in")], expected)
    assert a.counts[(0, "attn_in")] == 14


def test_require_reports_missing_and_mismatched():
    store = make_store()
    store.require(["attn_in"], 2, "sha256:abc")
    with pytest.raises(KvtoolError, match="missing for 1 of 3 layers"):
        store.require(["attn_in"], 3)
    with pytest.raises(KvtoolError, match="'k' missing"):
        store.require(["k"], 2)
    with pytest.raises(KvtoolError, match="different model"):
        store.require(["attn_in"], 2, "sha256:other")


def test_load_rejects_damaged_or_missing(tmp_path):
    with pytest.raises(KvtoolError, match="not a statistics folder"):
        StatsStore.load(tmp_path)
    make_store().save(tmp_path)
    (tmp_path / "stats.safetensors").write_bytes(b"garbage")
    with pytest.raises(KvtoolError, match="damaged"):
        StatsStore.load(tmp_path)


def test_parse_stats():
    assert parse_stats("k,attn_in") == ("attn_in", "k")
    with pytest.raises(KvtoolError, match="unknown statistics"):
        parse_stats("attn_in,bogus")


def test_saved_bytes_are_deterministic_and_damage_is_detected(tmp_path):
    """Same store -> same bytes (one safetensors metadata entry, sorted manifest); a flipped byte or a manifest
    without a model hash is reported as damaged, not silently used."""
    import json

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_store().save(tmp_path / name)
    for f in ("stats.safetensors", "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    data = bytearray((tmp_path / "a" / "stats.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "a" / "stats.safetensors").write_bytes(bytes(data))
    with pytest.raises(KvtoolError, match="damaged"):
        StatsStore.load(tmp_path / "a")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["model"] = {}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KvtoolError, match="damaged"):
        StatsStore.load(tmp_path / "b")
    with pytest.raises(KvtoolError, match="without a model hash"):
        StatsStore().save(tmp_path / "c")


def test_non_finite_statistics_are_refused_on_load(tmp_path):
    store = make_store()
    store.sums[(1, "attn_in")][0, 0] = float("nan")
    store.save(tmp_path)
    with pytest.raises(KvtoolError, match="non-finite values"):
        StatsStore.load(tmp_path)


@pytest.mark.parametrize("d", [100, 384, 577])
def test_blocked_gram_equals_one_product_and_is_symmetric(d):
    """gram_f64 multiplies only the blocks on and above the diagonal: exactly symmetric, equal to xᵀx to rounding."""
    from kvtool.calib.stats import gram_f64

    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    got = gram_f64(x)
    want = x.T @ x
    assert torch.equal(got, got.T)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


@pytest.mark.parametrize("d,block", [(96, 32), (100, 48)])
def test_wide_statistics_accumulate_upper_blocks_then_mirror(d, block):
    """The tensor-core path for wide statistics (down_in) adds only the blocks on and above the diagonal across
    batches and mirrors them when read: exactly symmetric, equal to the sum of full float32-product Grams to
    float32 rounding, counts summed; an ordinary-width statistic in the same store takes the full product."""
    from kvtool.calib.stats import gram_fp32

    g = torch.Generator().manual_seed(d)
    batches = [torch.randn(64, d, generator=g).to(torch.bfloat16) for _ in range(3)]
    store = StatsStore(exact=False)
    store.wide_block = block
    for x in batches:
        store.add(0, "down_in", x)
        store.add(0, "attn_in", x[:, : block])  # narrower than two blocks: full product
    raw = store.sums[(0, "down_in")]
    assert float(raw[block:, :block].abs().max()) == 0  # below the diagonal blocks: nothing multiplied
    want = sum(gram_fp32(x).double() for x in batches)
    got = store.sum(0, "down_in")
    assert torch.equal(got, got.T)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    assert float(got[block:, :block].abs().max()) > 0  # ... until the mirror filled it
    assert store.count(0, "down_in") == 3 * 64
    narrow = store.sum(0, "attn_in")
    torch.testing.assert_close(narrow, sum(gram_fp32(x[:, :block]).double() for x in batches))


def test_wide_statistics_mirror_before_merge_and_save(tmp_path):
    """A store still holding upper blocks is completed before it is merged into another or saved."""
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    a, b = StatsStore(exact=False), StatsStore(exact=False)
    a.wide_block = b.wide_block = 16
    a.add(0, "down_in", x)
    b.add(0, "down_in", x)
    merged = StatsStore().merge(a).merge(b)
    got = merged.sum(0, "down_in")
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got, 2 * a.sum(0, "down_in"))
    a.meta = {"model": {"hash": "sha256:x"}}
    a.add(1, "down_in", x)
    a.save(tmp_path)
    loaded = StatsStore.load(tmp_path).sum(1, "down_in")
    assert torch.equal(loaded, loaded.T)


def test_host_empty_large_buffers_are_ordinary_tensors(tmp_path):
    """Large host sums (huge-page backed where the kernel allows) behave as ordinary tensors: writable, saved,
    freed with the tensor."""
    import gc

    from kvtool.calib.stats import host_empty, symmetrize_upper

    small = host_empty((4, 4), torch.float64)
    big = host_empty((2048, 2048), torch.float64)  # 33.6 MB: the mapped path
    assert small.shape == (4, 4) and big.shape == (2048, 2048) and big.dtype == torch.float64
    big.copy_(symmetrize_upper(torch.arange(big.numel(), dtype=torch.float64).view(big.shape)))
    assert float(big[-1, -1]) == big.numel() - 1 and float(big[-1, 0]) == 2047
    store = StatsStore({"model": {"hash": "sha256:x"}})
    store.sums[(0, "down_in")], store.counts[(0, "down_in")] = big, 1
    store.save(tmp_path)
    assert torch.equal(StatsStore.load(tmp_path).sum(0, "down_in"), big)
    del big, store
    gc.collect()


def test_sums_written_layer_by_layer_equal_the_saved_store(tmp_path):
    """write_to: each layer's sums go into the statistics file as the layer completes and leave memory; the file
    (header written first, from the plan of every sum's shape) loads with safetensors and StatsStore.load and holds
    exactly the sums an in-memory run saves; the same run writes the same bytes."""
    from conftest import tiny_model
    from safetensors import safe_open
    from safetensors.torch import load_file

    from kvtool.calib.collect import collect_statistics
    from kvtool.models import wrap_model

    loaded = wrap_model(tiny_model("llama", seed=5))
    windows = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(6))
    meta = {"model": {"hash": "sha256:tiny"}}
    in_memory = collect_statistics(loaded, windows, "attn_in,q,k,v,o_in,mlp_in,down_in", batch_size=4)
    in_memory.meta = meta
    (tmp_path / "a").mkdir()
    in_memory.save(tmp_path / "a")
    digests = []
    for name in ("b", "c"):
        (tmp_path / name).mkdir()
        streamed = collect_statistics(loaded, windows, "attn_in,q,k,v,o_in,mlp_in,down_in", batch_size=4,
                                      write_to=tmp_path / name)
        assert streamed.sums == {} and streamed.names() == in_memory.names()  # nothing left in memory
        with pytest.raises(KvtoolError, match="written to disk"):
            streamed.sum(0, "attn_in")
        streamed.meta = meta
        streamed.save(tmp_path / name)
        digests.append((tmp_path / name / "stats.safetensors").read_bytes())
    assert digests[0] == digests[1]
    # the manifest's digest: sha256 of the 16 MiB chunks' sha256 digests (hashed in parallel)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    chunks = [digests[0][i:i + (1 << 24)] for i in range(0, len(digests[0]), 1 << 24)]
    assert manifest["tensors_digest"] == "sha256-16MiB-chunks:" + hashlib.sha256(
        b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    assert (tmp_path / "a" / "stats.safetensors").read_bytes() == digests[0]  # one writer, one layout
    raw = load_file(str(tmp_path / "b" / "stats.safetensors"))
    with safe_open(str(tmp_path / "b" / "stats.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "layout": "upper-triangle"}
    back = StatsStore.load(tmp_path / "b")
    assert set(raw) == {f"layers.{i}.{n}" for i, n in in_memory.sums}
    for (i, n), ref in in_memory.sums.items():
        # on disk: the upper triangle, rows in order; read back: exactly the symmetric sum held in memory
        rows, cols = torch.triu_indices(ref.shape[-1], ref.shape[-1])
        assert torch.equal(raw[f"layers.{i}.{n}"], ref[..., rows, cols])
        assert torch.equal(ref, ref.mT) and torch.equal(back.sum(i, n), ref)
        assert back.count(i, n) == in_memory.count(i, n)


def test_sums_file_refuses_what_its_plan_does_not_name(tmp_path):
    """The header is written from the plan before any sum: a sum out of order or of another shape is an error, not a
    file whose header lies; a file closed short of its plan is an error too."""
    from kvtool.calib.stats import SumsFile

    f = SumsFile(tmp_path / "s.safetensors", [("layers.0.attn_in", (4, 4)), ("layers.0.q", (2, 3, 3))])
    with pytest.raises(KvtoolError, match="expected"):
        f.write("layers.0.q", torch.zeros(2, 3, 3))
    with pytest.raises(KvtoolError, match="expected"):
        f.write("layers.0.attn_in", torch.zeros(4, 5))
    f.write("layers.0.attn_in", torch.ones(4, 4))
    with pytest.raises(KvtoolError, match="1 of 2"):
        f.close()


def test_sums_file_writes_large_sums_in_pieces_at_their_offsets(tmp_path, monkeypatch):
    """Sums larger than one piece are written by several threads at their planned offsets: the file is what
    safetensors writes for the same tensors (bytes of every tensor, in order), and loads back exactly."""
    from safetensors.torch import load_file

    from kvtool.calib.stats import SumsFile

    monkeypatch.setattr(SumsFile, "PIECE", 1000)  # many pieces, a short last one
    g = torch.Generator().manual_seed(3)
    tensors = {"layers.0.attn_in": torch.randn(37, 37, generator=g, dtype=torch.float64),
               "layers.0.q": torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
               "layers.1.attn_in": torch.randn(37, 37, generator=g, dtype=torch.float64)}
    f = SumsFile(tmp_path / "s.safetensors", [(n, tuple(t.shape)) for n, t in tensors.items()])
    for n, t in tensors.items():
        f.write(n, t)
    f.close()
    back = load_file(str(tmp_path / "s.safetensors"))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(back[n], t)
    data = (tmp_path / "s.safetensors").read_bytes()
    body = b"".join(t.numpy().tobytes() for t in tensors.values())
    assert data.endswith(body) and len(data) == 8 + int.from_bytes(data[:8], "little") + len(body)


def test_statistics_digest_spans_chunks_and_catches_damage(tmp_path, monkeypatch):
    """The chunked digest covers every byte (several chunks, a short last one) and is checked with the chunk size its
    label names (a file hashed in 1 MiB chunks loads with the 16 MiB default restored); a flipped byte in any chunk
    makes the folder unreadable with the one-line error; folders written with a whole-file sha256 still load."""
    import kvtool.calib.stats as stats_module

    monkeypatch.setattr(stats_module, "DIGEST_CHUNK", 1 << 20)  # several chunks from a small file
    store = StatsStore({"model": {"hash": "sha256:abc"}})
    for layer in range(2):  # 2 x 600 x 601 / 2 float64 values: 2.9 MB
        store.add(layer, "attn_in", torch.randn(30, 600, generator=torch.Generator().manual_seed(layer)))
    store.save(tmp_path)
    monkeypatch.setattr(stats_module, "DIGEST_CHUNK", 1 << 24)
    path = tmp_path / "stats.safetensors"
    data = path.read_bytes()
    assert len(data) > 2 << 20 and len(data) % (1 << 20)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tensors_digest"] == "sha256-1MiB-chunks:" + hashlib.sha256(b"".join(
        hashlib.sha256(data[i:i + (1 << 20)]).digest() for i in range(0, len(data), 1 << 20))).hexdigest()
    assert torch.equal(StatsStore.load(tmp_path).sum(1, "attn_in"), store.sum(1, "attn_in"))
    for where in (len(data) // 2, len(data) - 1):
        damaged = bytearray(data)
        damaged[where] ^= 1
        path.write_bytes(bytes(damaged))
        with pytest.raises(KvtoolError, match="damaged"):
            StatsStore.load(tmp_path)
    path.write_bytes(data)
    for label in ("sha256-0MiB-chunks:", "sha256-16MiB-chunks:", "md5:"):  # a label that does not fit the file
        (tmp_path / "manifest.json").write_text(json.dumps(
            {**manifest, "tensors_digest": label + manifest["tensors_digest"].split(":")[1]}))
        with pytest.raises(KvtoolError, match="damaged"):
            StatsStore.load(tmp_path)
    del manifest["tensors_digest"]
    manifest["tensors_sha256"] = hashlib.sha256(data).hexdigest()  # a folder from before the chunked digest
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert StatsStore.load(tmp_path).layers() == store.layers()


def test_packed_sums_round_trip_and_old_whole_matrix_files_load(tmp_path):
    """pack_upper / unpack_upper are inverse on symmetric sums (2-D and batched [G, d, d]); a statistics file
    written before the packed layout (whole matrices, no layout in its header) still loads; an unknown layout is
    the one-line error."""
    from safetensors.torch import save_file

    from kvtool.calib.stats import pack_upper, packed_shape, symmetrize_upper, tensors_digest, unpack_upper

    g = torch.Generator().manual_seed(0)
    for shape in ((1, 1), (5, 5), (3, 4, 4)):
        t = symmetrize_upper(torch.randn(shape, generator=g, dtype=torch.float64))
        p = pack_upper(t)
        assert tuple(p.shape) == packed_shape(shape) and torch.equal(unpack_upper(p), t)
    assert pack_upper(torch.arange(9.0).view(3, 3)).tolist() == [0, 1, 2, 4, 5, 8]  # rows of the upper triangle
    with pytest.raises(ValueError, match="not square"):
        pack_upper(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        unpack_upper(torch.zeros(4))
    store = StatsStore({"model": {"hash": "sha256:abc"}})
    store.add(0, "attn_in", torch.randn(20, 6, generator=g))
    store.add_gram(0, "q", torch.randn(2, 3, 3, generator=g), 20)
    store.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    path = tmp_path / "stats.safetensors"
    for metadata in ({"format": "pt"}, {"format": "pt", "layout": "lower-triangle"}):
        save_file({f"layers.0.{n}": store.sum(0, n) for n in ("attn_in", "q")}, str(path), metadata=metadata)
        manifest["tensors_digest"] = tensors_digest(path)
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        if "layout" in metadata:
            with pytest.raises(KvtoolError, match="'lower-triangle', which this kvtool does not read"):
                StatsStore.load(tmp_path)
        else:
            old = StatsStore.load(tmp_path)
            assert all(torch.equal(old.sum(0, n), store.sum(0, n)) for n in ("attn_in", "q"))


def test_blocked_sums_written_without_mirroring_equal_the_in_memory_sums(tmp_path, monkeypatch):
    """A wide sum kept as its blocks on and above the diagonal is written packed straight from those blocks (no
    mirror first): it reads back equal to the same sum completed in memory."""
    import kvtool.calib.stats as stats_module

    monkeypatch.setattr(stats_module, "GRAM_BLOCK", 4)  # width 13 >= 2 blocks: the in-place blocked path
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(9, 13, generator=g, dtype=torch.float64) for _ in range(3)]
    meta = {"model": {"hash": "sha256:abc"}}
    in_memory, written = StatsStore(meta), StatsStore(meta)
    written.write_to(tmp_path, [(0, "attn_in", (13, 13))])
    for x in xs:
        in_memory.add(0, "attn_in", x)
        written.add(0, "attn_in", x)
    assert (0, "attn_in") in written._upper
    written.offload(0)
    assert written.sums == {} and written._upper == {}
    written.save(tmp_path)
    ref = in_memory.sum(0, "attn_in")
    assert torch.equal(ref, ref.mT) and torch.equal(StatsStore.load(tmp_path).sum(0, "attn_in"), ref)
