"""The evaluation suite (embedded, prose, code) and mixtures: disjoint parts, weights, windows only from the
calibration parts, per-domain perplexity and its geometric mean in the CLI and recipe reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvtool.data import (
    DOMAINS,
    SUITE,
    TextSource,
    allocate,
    calibration_windows,
    heldout_streams,
    load_text,
    mixture,
    part_documents,
    tokenize,
)
from kvtool.errors import KvtoolError


def _bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.int32).numpy().tobytes()


def test_every_domain_has_disjoint_nonempty_parts():
    """No held-out document of any domain occurs in the calibration text of any domain."""
    calib_text = {d: load_text(TextSource(d, "calib")) for d in DOMAINS}
    for d in DOMAINS:
        held = part_documents(TextSource(d, "heldout"))
        assert len(held) >= 4 and len(part_documents(TextSource(d, "calib"))) > 3 * len(held) / 2, d
        for doc in held:
            probe = doc.strip()[:300]
            assert len(probe) > 50 or d == "embedded", (d, probe)
            if len(probe) > 50:
                assert not any(probe in c for c in calib_text.values()), (d, probe[:80])


def test_prose_is_natural_language_and_code_is_python():
    prose = load_text(TextSource("prose", "heldout"))
    code = load_text(TextSource("code", "heldout"))
    assert prose.startswith("Then Jesus spoke to the multitudes")  # Matthew 23: the first held-out chapter
    words = prose.split()
    assert len(words) > 100_000 and sum(w.isalpha() for w in words) / len(words) > 0.7
    assert "def " in code and "import " in code and compile(part_documents(TextSource("code", "heldout"))[0],
                                                                   "termui.py", "exec")


def test_mixture_grammar_and_weights():
    assert mixture("embedded") is None and mixture("my.txt") is None
    assert mixture(SUITE) == [(d, pytest.approx(1 / 3)) for d in DOMAINS]
    assert mixture("embedded=3,code") == [("embedded", 0.75), ("code", 0.25)]
    for bad, fragment in [("embedded=0,code", "weight > 0"), ("embedded=x,code", "not a number"),
                          ("code,code", "appears twice"), ("suite,code", "itself a mixture"), ("=2,code", "source")]:
        with pytest.raises(KvtoolError, match=fragment):
            mixture(bad)
    assert allocate(10, [0.75, 0.25]) == [8, 2] and allocate(3, [1 / 3] * 3) == [1, 1, 1]
    assert sum(allocate(64, [0.5, 0.3, 0.2])) == 64


def test_suite_windows_come_only_from_calibration_parts(tiny_tokenizer):
    """Every suite window is a slice of one domain's calibration documents and of none of the held-out parts; the
    domains share the windows by weight; the same call gives the same windows."""
    windows = calibration_windows(tiny_tokenizer, TextSource(SUITE, "calib"), 12, 64, seed=3)
    assert windows.shape == (12, 64)
    assert torch.equal(windows, calibration_windows(tiny_tokenizer, TextSource(SUITE, "calib"), 12, 64, seed=3))
    calib = {d: _bytes(tokenize("\n\n".join(part_documents(TextSource(d, "calib"))), tiny_tokenizer))
             for d in ("embedded", "code")}
    held = b"".join(_bytes(tokenize(load_text(TextSource(d, "heldout")), tiny_tokenizer)) for d in DOMAINS)
    prose_calib = load_text(TextSource("prose", "calib"))
    prose_held = load_text(TextSource("prose", "heldout"))
    counts = dict.fromkeys(DOMAINS, 0)
    for w in windows:
        assert _bytes(w) not in held
        text = tiny_tokenizer.decode(w)
        owner = [d for d in ("embedded", "code") if _bytes(w) in calib[d]]
        if not owner:  # prose windows: compared as text (its calibration part is 3.8 M characters)
            inner = text[8:-8]
            assert inner in prose_calib and inner not in prose_held, text[:80]
            owner = ["prose"]
        counts[owner[0]] += 1
    assert counts == {"embedded": 4, "prose": 4, "code": 4}


def test_heldout_streams_are_prefixes_of_each_part(tiny_tokenizer):
    streams = heldout_streams(tiny_tokenizer, TextSource(SUITE, "heldout"), 3000)
    assert list(streams) == list(DOMAINS)
    for d, s in streams.items():
        whole = tokenize(load_text(TextSource(d, "heldout"))[:40_000], tiny_tokenizer)
        assert s.numel() == 3000 and torch.equal(s, whole[:3000]), d


def test_eval_suite_json_and_table(tiny_checkpoint):
    from typer.testing import CliRunner

    from kvtool.cli import app

    model = str(tiny_checkpoint("llama"))
    res = CliRunner().invoke(app, ["eval", model, "--dataset", "suite", "--max-tokens", "256", "--seq-len", "64",
                                   "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert list(out["domains"]) == list(DOMAINS)
    ppl = [out["domains"][d]["perplexity"] for d in DOMAINS]
    assert len(set(ppl)) == 3 and all(out["domains"][d]["tokens"] == 256 for d in DOMAINS)
    assert math.isclose(out["geometric_mean"], math.exp(sum(map(math.log, ppl)) / 3), rel_tol=1e-12)
    assert "click" in out["domains"]["code"]["origin"] and len(out["domains"]["prose"]["sha256"]) == 64
    table = CliRunner().invoke(app, ["eval", model, "--dataset", "suite", "--max-tokens", "256", "--seq-len", "64",
                                     "--no-progress", "--device", "cpu"])
    assert table.exit_code == 0 and "prose:heldout" in table.output and "geometric mean" in table.output
    bad = CliRunner().invoke(app, ["eval", model, "--dataset", "embedded=-1,code"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error:") and "weight > 0" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_defaults_calibrate_and_heal_on_the_suite():
    from kvtool.commands.calibrate import CALIBRATE_DATA
    from kvtool.methods.care import ConvertMla
    from kvtool.methods.heal import Heal

    assert ConvertMla.data_defaults["dataset"] == Heal.data_defaults["dataset"] == CALIBRATE_DATA["dataset"] == SUITE


def test_recipe_report_has_a_column_per_domain():
    from kvtool.recipe import report_markdown

    report = {"recipe": "r.yaml", "seconds": 1.0, "steps": [], "perplexity": {
        "original": {"embedded": 10.0, "prose": 30.0, "code": 9.0, "geometric_mean": 13.9},
        "healed": {"embedded": 12.0, "prose": 33.0, "code": 10.0, "geometric_mean": 15.8}}}
    md = report_markdown(report)
    assert "| model | embedded | prose | code | geometric mean |" in md and "| healed | 12.000 | 33.000 |" in md
