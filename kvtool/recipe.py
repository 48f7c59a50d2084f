"""Recipes: YAML files that chain calibration, methods, validation and evaluation (``kvtool run``).

Format (every method step's keys are that method's Options, the same names as its CLI flags)::

    model: smollm2-135m                 # any model argument kvtool accepts
    output: out/care-smoke              # optional; -o overrides
    data: {dataset: suite, samples: 16, seq_len: 256, seed: 0, batch_size: 8}   # the CLI's data flags (default
                                        #   dataset: suite, as calibrate / convert-mla / heal)
    device: auto
    dtype: auto
    statistics: []                      # extra statistics to collect beyond what the steps need
    steps:
      - convert-mla: {name: mla, kv_ratio: 0.5, rope: keep}   # method steps: convert-mla (care), corda,
                                                             #   export (oscar), ladder
      - validate: {target: mla}                              # the step's Triton-kernel check
      - eval: {targets: [original, mla], max_tokens: 4096, seq_len: 512}   # held-out part of data.dataset (or of
                                                    #   the step's dataset:); suite/a mixture: each part, 4096 tokens
      - eval: {targets: [original], kv_quant: oscar}         # OSCAR: a step name or int2/int4/hadamard-int2/kivi-int2
      - generate: {target: mla, prompt: "def fib(n):", max_new_tokens: 32}   # greedy text, in the report

Step names are plain names (letters, digits, ``.``, ``_``, ``-``; not ``stats`` or ``original``), unique, and each
method step writes ``OUT/<name>/``. Everything checkable without the model (keys, types, values, names, targets)
is checked when the recipe is read, so ``--dry-run`` catches it; checks that need the model's shapes run before
calibrating. The statistics every step needs are collected in one calibration pass into ``OUT/stats`` (passes a
step needs on the calibration windows, such as Ladder drift, ride the same pass; statistics are reused on a
rerun when its manifest matches: same model hash, same data options and text, every needed statistic present). The
run ends with ``OUT/report.json`` and ``OUT/report.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtool.errors import KvtoolError
from kvtool.options import DataOptions, _coerce

TOP_KEYS = {"model": str | None, "output": str | None, "data": dict, "device": str, "dtype": str,
            "statistics": list, "steps": list}
VALIDATE_KEYS = {"target": str}
GENERATE_KEYS = {"target": str, "prompt": str, "max_new_tokens": int}
GENERATE_PROMPT = "The difference between a list and a tuple in Python is"
EVAL_KEYS = {"targets": list, "dataset": str, "max_tokens": int, "seq_len": int, "batch_size": int,
             "kv_quant": str | None,
             "residual_window": int | None, "sink": int | None}
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_NAMES = {"stats", "original", "report.json", "report.md"}


@dataclass
class Step:
    kind: str  # a method name, validate or eval
    name: str
    options: Any = field(default_factory=dict)  # the method's Options, or a dict for validate/eval
    target: str | None = None  # heal: the earlier step whose output it acts on


@dataclass
class Recipe:
    path: Path
    model: str | None
    output: str | None
    data: DataOptions
    device: str
    dtype: str
    statistics: list[str]
    steps: list[Step]


def _check_keys(where: str, given: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in given.items():
        if key not in allowed:
            raise KvtoolError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        if allowed[key] in (dict, list):
            if not isinstance(value, allowed[key]):
                raise KvtoolError(f"{where}: {key} must be a {allowed[key].__name__}, got {type(value).__name__}")
            out[key] = value
        else:
            out[key] = _coerce(value, allowed[key], f"{where}: {key}")
    return out


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML; list indices allowed: ``steps.0.convert-mla.kv_ratio=0.25``)."""
    if "=" not in assignment:
        raise KvtoolError(f"--set {assignment!r}: use KEY=VALUE, e.g. data.samples=8")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise KvtoolError(f"--set {key}: {raw!r} is not a valid YAML value (quote strings with special "
                          "characters)") from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KvtoolError(f"--set {key}: {part!r} is not a step index (0..{len(node) - 1})")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise KvtoolError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")


def _step_name(path: Path, i: int, name: Any, names: set[str]) -> str:
    if not isinstance(name, str) or not STEP_NAME.fullmatch(name) or name in RESERVED_NAMES or name.startswith(".."):
        raise KvtoolError(f"{path}: steps[{i}] name {name!r} is not a plain name: use letters, digits, '.', '_' "
                          "and '-' (not a path; not stats or original)")
    if name in names:
        raise KvtoolError(f"{path}: steps[{i}] name {name!r} is already used: give each step a unique name")
    return name


def _wrote_model(name: str, steps: list[Step]) -> bool:
    """Whether the earlier method step ``name`` writes a loadable checkpoint (eval and generate targets)."""
    from kvtool.methods import METHODS

    return METHODS[next(s.kind for s in steps if s.name == name)].writes_model


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a KvtoolError naming the key."""
    from kvtool.methods import ALIASES, METHODS

    path = Path(path)
    if not path.is_file():
        raise KvtoolError(f"recipe {path} does not exist: give a YAML file (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise KvtoolError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise KvtoolError(f"recipe {path} must be a mapping with model, data, steps")
    raw = copy.deepcopy(raw)
    for o in overrides or []:
        set_override(raw, o)
    top = _check_keys(str(path), raw, TOP_KEYS)
    data = DataOptions.from_dict({"dataset": "suite", "samples": 16, "seq_len": 256, **(top.get("data") or {})},
                                 f"{path}: data")
    from kvtool.data import mixture

    mixture(data.dataset)
    if data.split != "calib":
        raise KvtoolError(f"{path}: data.split must be calib (recipes calibrate on the calibration part and "
                          "evaluate on the held-out part)")
    from kvtool.calib.stats import parse_stats

    statistics = list(parse_stats(top["statistics"])) if top.get("statistics") else []
    steps: list[Step] = []
    names: set[str] = set()
    kinds = ", ".join([*METHODS, "validate", "eval", "generate"])
    for i, entry in enumerate(top.get("steps") or []):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise KvtoolError(f"{path}: steps[{i}] must be a mapping with one key ({kinds})")
        kind, opts = next(iter(entry.items()))
        if opts is not None and not isinstance(opts, dict):
            raise KvtoolError(f"{path}: steps[{i}].{kind} must be a mapping of options")
        opts = dict(opts or {})
        kind = ALIASES.get(kind, kind)
        where = f"{path}: steps[{i}].{kind}"
        target = None
        if kind in METHODS:
            name = _step_name(path, i, opts.pop("name", kind), names)
            method = METHODS[kind]
            if method.acts_on_output:
                target = opts.pop("target", None)
                if target not in names:
                    raise KvtoolError(f"{where} target {target!r} is not an earlier method step: name the "
                                      "convert-mla step to heal")
            names.add(name)
            options: Any = method.Options.from_dict(opts, where)
            method.preflight(None, options)
            method.check_data(options, data)
        elif kind == "validate":
            options = _check_keys(where, opts, VALIDATE_KEYS)
            if options.get("target") not in names:
                raise KvtoolError(f"{where} target {options.get('target')!r} is not an earlier method step")
            name = f"validate-{options['target']}"
        elif kind == "eval":
            options = _check_keys(where, opts, EVAL_KEYS)
            options.setdefault("targets", ["original"])
            if "dataset" in options:
                from kvtool.data import mixture

                mixture(options["dataset"])  # a malformed mixture fails when the recipe is read
            for t in options["targets"]:
                if t != "original" and t not in names:
                    raise KvtoolError(f"{where} target {t!r} is not 'original' or an earlier step")
                if t != "original" and not _wrote_model(t, steps):
                    raise KvtoolError(f"{where} target {t!r} wrote no model to evaluate (an export is evaluated "
                                      f"with `kv_quant: {t}` on the original model)")
            kv = options.get("kv_quant")
            if kv is not None and kv not in names and kv not in ("int2", "int4", "hadamard-int2", "kivi-int2"):
                raise KvtoolError(f"{where} kv_quant {kv!r} is not an earlier export step or one of int2, int4, "
                                  "hadamard-int2, kivi-int2")
            for key in ("max_tokens", "seq_len", "batch_size"):
                if key in options and options[key] < (2 if key == "seq_len" else 1):
                    raise KvtoolError(f"{where} {key} {options[key]} is too small")
            name = f"eval-{i}"
        elif kind == "generate":
            options = _check_keys(where, opts, GENERATE_KEYS)
            model_target = options.setdefault("target", "original")
            if model_target != "original" and (model_target not in names or not _wrote_model(model_target, steps)):
                raise KvtoolError(f"{where} target {model_target!r} is not 'original' or an earlier step that wrote a "
                                  "model")
            options.setdefault("prompt", GENERATE_PROMPT)
            options.setdefault("max_new_tokens", 32)
            if not 1 <= options["max_new_tokens"] <= 4096:
                raise KvtoolError(f"{where} max_new_tokens {options['max_new_tokens']} must be in 1..4096")
            name = f"generate-{i}"
        else:
            raise KvtoolError(f"{path}: steps[{i}] has unknown kind {kind!r}: use {kinds}")
        steps.append(Step(kind, name, options, target))
    if not steps:
        raise KvtoolError(f"{path}: no steps: add at least one step")
    return Recipe(path, top.get("model"), top.get("output"), data, top.get("device", "auto"),
                  top.get("dtype", "auto"), statistics, steps)


def required_stats(recipe: Recipe) -> tuple[str, ...]:
    """Union of the statistics every method step needs (plus ``statistics``), in canonical order."""
    from kvtool.calib.stats import ALL_STATS
    from kvtool.methods import METHODS

    wanted = set(recipe.statistics)
    for step in recipe.steps:
        if step.kind in METHODS:
            wanted |= set(METHODS[step.kind].required_stats(step.options))
    return tuple(n for n in ALL_STATS if n in wanted)


def preflight(recipe: Recipe, spec: Any) -> None:
    """The checks that need the model's shapes (before any calibration; also in --dry-run when the model is there)."""
    from kvtool.methods import METHODS

    for step in recipe.steps:
        if step.kind in METHODS:
            METHODS[step.kind].preflight(spec, step.options)


def plan(recipe: Recipe, spec: Any | None) -> dict[str, Any]:
    """What a run will do: steps, statistics, and a rough peak-memory estimate (bytes) when the spec is known."""
    stats = required_stats(recipe)
    est: dict[str, int] = {}
    if spec is not None:
        d, i, hd = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim
        per_layer = {"attn_in": d * d, "mlp_in": d * d, "o_in": hd * hd, "down_in": i * i,
                     "q": spec.num_kv_heads * spec.head_dim ** 2, "k": spec.num_kv_heads * spec.head_dim ** 2,
                     "v": spec.num_kv_heads * spec.head_dim ** 2}
        est["statistics"] = 8 * spec.num_layers * sum(per_layer[s] for s in stats)
        est["hidden_states"] = 4 * recipe.data.samples * recipe.data.seq_len * d
        params = spec.num_layers * (d * (hd + 2 * spec.num_kv_heads * spec.head_dim) + hd * d + 3 * d * i)
        est["model"] = 4 * (params + 2 * spec.vocab_size * d)
        est["total"] = sum(est.values())
    return {"model": recipe.model or "smollm2-135m", "data": recipe.data.to_dict(), "statistics": list(stats),
            "steps": [{"kind": s.kind, "name": s.name,
                       "options": s.options.to_dict() if hasattr(s.options, "to_dict") else s.options}
                      for s in recipe.steps],
            "estimated_peak_bytes": est}


def _stats_match(stats_dir: Path, model_hash: str, windows_sha256: str, names: tuple[str, ...]) -> bool:
    """Saved statistics are reused only for the same model bytes and the same calibration windows (token ids, so a
    changed text file, tokenizer, sample count, length or seed all recalibrate)."""
    from kvtool.calib.stats import MANIFEST_FILE

    try:
        manifest = json.loads((stats_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("model", {}).get("hash") == model_hash and manifest.get("windows_sha256") == windows_sha256
            and set(names) <= set(manifest.get("stats", [])))


def _load_target(name: str, out: Path, loaded: Any) -> Any:
    """The model an eval step scores: the source, or a step's output (CorDA: residual base + PEFT adapter)."""
    from kvtool.models import load_model

    if name == "original":
        return loaded
    return load_model(str(out / name), strict=False)  # a CorDA output loads as base + adapter


def run_recipe(recipe: Recipe, out: Path, progress: bool = True) -> dict[str, Any]:
    """Execute a recipe into ``out``; returns the report (also written as report.json and report.md)."""
    from kvtool.calib.collect import calibrate, windows_digest
    from kvtool.calib.runner import run_layers
    from kvtool.calib.stats import StatsStore
    from kvtool.checkpoint import atomic_dir, check_output_location, local_input, write_json
    from kvtool.data import TextSource, calibration_windows, heldout_streams
    from kvtool.device import resolve_device
    from kvtool.evaluate import geometric_mean, perplexity
    from kvtool.methods import METHODS, RunContext, validate
    from kvtool.models import load_model
    from kvtool.progress import progress_bar

    device = resolve_device(recipe.device)
    inputs = (local_input(recipe.model), local_input(recipe.data.dataset), recipe.path)
    check_output_location(out, inputs)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"recipe": str(recipe.path), "plan": plan(recipe, None), "steps": [], "perplexity": {}}
    t_all = time.perf_counter()
    loaded = load_model(recipe.model, dtype=recipe.dtype, device="cpu")
    preflight(recipe, loaded.spec)
    report["plan"] = plan(recipe, loaded.spec)
    names = required_stats(recipe)
    data = recipe.data
    stats_dir = out / "stats"
    store = None
    # passes the steps need on the calibration windows (e.g. Ladder drift) ride the one calibration pass
    step_visitors = {s.name: METHODS[s.kind].visitors(s.options) for s in recipe.steps if s.kind in METHODS}
    riders = [v for vs in step_visitors.values() for v in vs.values()]
    windows = None
    if names or riders:
        windows = calibration_windows(loaded.tokenizer, data.source(), data.samples, data.seq_len, data.seed,
                                      loaded.spec.max_positions)
    reuse = bool(names) and _stats_match(stats_dir, loaded.model_hash, windows_digest(windows), names)
    if riders and (reuse or not names):
        t0 = time.perf_counter()
        run_layers(loaded, windows, riders, device=device, batch_size=data.batch_size, progress=progress,
                   description="calibration pass")
        report["steps"].append({"kind": "calibrate", "name": "pass", "seconds": time.perf_counter() - t0,
                                "reused": False, "statistics": [], "tokens": int(windows.numel())})
    if names:
        t0 = time.perf_counter()
        if reuse:
            store = StatsStore.load(stats_dir)
            report["steps"].append({"kind": "calibrate", "name": "stats", "seconds": 0.0, "reused": True})
        else:
            store = calibrate(loaded, data.source(), names, samples=data.samples, seq_len=data.seq_len,
                              seed=data.seed, device=device, batch_size=data.batch_size, progress=progress,
                              visitors=riders, windows=windows)
            with atomic_dir(stats_dir, overwrite=True, inputs=inputs) as tmp:
                store.save(tmp)
            report["steps"].append({"kind": "calibrate", "name": "stats", "seconds": time.perf_counter() - t0,
                                    "reused": False, "statistics": list(names), "tokens": store.meta["tokens"]})
    ctx = RunContext(device=device, dtype=recipe.dtype, data=data, overwrite=True, progress=False, inputs=inputs)
    with progress_bar(progress) as bar:
        task = bar.add_task("recipe steps", total=len(recipe.steps))
        for step in recipe.steps:
            bar.update(task, description=f"{step.kind}: {step.name}")
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"kind": step.kind, "name": step.name}
            if step.kind in METHODS:
                ctx.visitors = step_visitors[step.name]
                opts, source = step.options, loaded
                if step.target is not None:  # heal: the earlier step's output, against the recipe's model
                    source = load_model(str(out / step.target), strict=False)
                    if opts.teacher is None:
                        opts = dataclasses.replace(opts, teacher=str(recipe.model or "smollm2-135m"))
                result = METHODS[step.kind].run(source, store, out / step.name, opts, ctx)
                entry["report"] = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
            elif step.kind == "generate":
                model = _load_target(step.options["target"], out, loaded)
                entry["target"], entry["prompt"] = step.options["target"], step.options["prompt"]
                entry["text"] = greedy_text(model, step.options["prompt"], step.options["max_new_tokens"])
                report.setdefault("generations", []).append({k: entry[k] for k in ("target", "prompt", "text")})
            elif step.kind == "validate":
                entry["report"] = validate(out / step.options["target"], {"device": device})
                if not entry["report"].get("passed"):
                    raise KvtoolError(f"validation of {step.options['target']} failed: {entry['report']}")
            else:
                seq_len, max_tokens = step.options.get("seq_len", 512), step.options.get("max_tokens", 4096)
                heldout = TextSource(step.options.get("dataset", data.dataset), "heldout", data.text_field)
                for target in step.options["targets"]:
                    model = _load_target(target, out, loaded)
                    kv = step.options.get("kv_quant")
                    key = f"{target} + kv {kv}" if kv else target
                    ppl = {}
                    for part, tokens in heldout_streams(model.tokenizer or loaded.tokenizer, heldout,
                                                        max_tokens).items():
                        if kv:
                            from kvtool.runtime.kvquant import eval_kv_quant

                            kv_arg = str(out / kv) if kv not in ("int2", "int4", "hadamard-int2", "kivi-int2") else kv
                            res = eval_kv_quant(model, tokens, kv_arg, None, step.options.get("residual_window"),
                                                step.options.get("sink"), seq_len=seq_len)
                        else:
                            res = perplexity(model.model, tokens, seq_len,
                                             batch_size=step.options.get("batch_size", 4))
                        ppl[part] = res["perplexity"]
                    # one text: its perplexity; a mixture (suite): every part's and their geometric mean
                    value = next(iter(ppl.values())) if len(ppl) == 1 else {
                        **ppl, "geometric_mean": geometric_mean(list(ppl.values()))}
                    report["perplexity"][key] = value
                    entry.setdefault("results", {})[key] = value
            entry["seconds"] = time.perf_counter() - t0
            report["steps"].append(entry)
            bar.advance(task)
    report["seconds"] = time.perf_counter() - t_all
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report))
    return report


def greedy_text(loaded: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by a loaded model, through ``generate`` with the model's own cache."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def report_markdown(report: dict[str, Any]) -> str:
    """A short human-readable report: steps with timings and key numbers, then perplexities."""
    lines = [f"# kvtool run: {report['recipe']}", "", f"Total time: {report['seconds']:.1f} s", "",
             "| step | kind | seconds | key results |", "|---|---|---|---|"]
    for s in report["steps"]:
        r = s.get("report") or {}
        keys = ("kv_bytes_per_token_before", "kv_bytes_per_token_after", "kv_ratio", "passed", "mean_err_k",
                "mean_err_v", "rel_logit_diff", "kv_bits_per_element", "adapter_energy")
        bits = [f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r]
        if s.get("reused"):
            bits.append("reused saved statistics")
        if "results" in s:
            bits += [f"ppl[{k}]={v['geometric_mean'] if isinstance(v, dict) else v:.3f}"
                     for k, v in s["results"].items()]
        lines.append(f"| {s['name']} | {s['kind']} | {s.get('seconds', 0):.1f} | {', '.join(bits)} |")
    single = {k: v for k, v in report["perplexity"].items() if not isinstance(v, dict)}
    mixed = {k: v for k, v in report["perplexity"].items() if isinstance(v, dict)}
    if single:
        lines += ["", "| model | held-out perplexity |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in single.items()]
    if mixed:  # one column per domain (part), then the geometric mean
        cols = list(dict.fromkeys(c for v in mixed.values() for c in v if c != "geometric_mean"))
        lines += ["", "| model | " + " | ".join(cols) + " | geometric mean |", "|---" * (len(cols) + 2) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{v[c]:.3f}" if c in v else "-" for c in cols) +
                  f" | {v['geometric_mean']:.3f} |" for k, v in mixed.items()]
    for g in report.get("generations", []):
        lines += ["", f"Greedy generation, {g['target']}: {g['prompt']!r} ->", "", "```", g["prompt"] + g["text"],
                  "```"]
    return "\n".join(lines) + "\n"
