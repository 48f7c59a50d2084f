"""Recipes: YAML files that chain calibration, transforms, validation and evaluation (``kvtool run``).

Format::

    model: smollm2-135m                 # any model argument kvtool accepts
    output: out/care-smoke              # optional; -o overrides
    dataset: {source: embedded, samples: 16, seq_len: 256, seed: 0, text_field: text}
    calibrate: {batch_size: 8, device: auto, dtype: float32, stats: []}   # stats: extra statistics to collect
    steps:
      - care: {name: mla, kv_ratio: 0.5, rope: keep}      # transform steps: care, corda, oscar, ladder
      - validate: {target: mla}                           # run the step's Triton-kernel check
      - eval: {targets: [original, mla], max_tokens: 4096, seq_len: 512}
      - eval: {targets: [original], kv_quant: oscar}      # OSCAR: a step name or int2/int4/hadamard-int2/kivi-int2

Every transform declares the statistics it needs; the union is collected in one calibration pass into
``OUT/stats`` (reused on a rerun when its manifest matches: same model hash and dataset, every needed statistic
present). Each step writes ``OUT/<name>/``; the run ends with ``OUT/report.json`` and ``OUT/report.md``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtool.errors import KvtoolError

TRANSFORMS = {"care": "kvtool.commands.care", "corda": "kvtool.commands.corda", "oscar": "kvtool.commands.oscar",
              "ladder": "kvtool.commands.ladder"}
TOP_KEYS = {"model": str, "output": str, "dataset": dict, "calibrate": dict, "steps": list}
DATASET_KEYS = {"source": str, "samples": int, "seq_len": int, "seed": int, "text_field": str}
CALIBRATE_KEYS = {"batch_size": int, "device": str, "dtype": str, "stats": list}
VALIDATE_KEYS = {"target": str}
EVAL_KEYS = {"targets": list, "max_tokens": int, "seq_len": int, "batch_size": int, "kv_quant": str,
             "residual_window": int, "sink": int}
RESERVED = {"loaded", "store", "out", "overwrite", "progress", "statistics", "options", "release_stats"}


@dataclass
class Step:
    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    path: Path
    model: str | None
    output: str | None
    dataset: dict[str, Any]
    calibrate: dict[str, Any]
    steps: list[Step]


def _check_keys(where: str, given: dict[str, Any], allowed: dict[str, type]) -> None:
    for key, value in given.items():
        if key not in allowed:
            raise KvtoolError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        want = allowed[key]
        ok = isinstance(value, want) or (want is float and isinstance(value, int)) or value is None
        if want is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise KvtoolError(f"{where}: {key} must be {want.__name__}, got {type(value).__name__} ({value!r})")


def transform_signature(kind: str) -> dict[str, type]:
    """Option names and types a transform step accepts (from its ``write_<kind>`` keyword arguments)."""
    module = importlib.import_module(TRANSFORMS[kind])
    fn = getattr(module, f"write_{kind}")
    allowed: dict[str, type] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind != inspect.Parameter.KEYWORD_ONLY or name in RESERVED:
            continue
        d = p.default
        allowed[name] = type(d) if d not in (None, inspect.Parameter.empty) and not isinstance(d, tuple) else object
    if kind == "care":
        from kvtool.convert.care import CareOptions

        for name, f in CareOptions.__dataclass_fields__.items():
            allowed[name] = type(f.default) if f.default is not None else object
    return allowed


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML; list indices allowed: ``steps.0.care.kv_ratio=0.25``)."""
    if "=" not in assignment:
        raise KvtoolError(f"--set {assignment!r}: use KEY=VALUE, e.g. dataset.samples=8")
    key, raw = assignment.split("=", 1)
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KvtoolError(f"--set {key}: {part!r} is not a step index (0..{len(node) - 1})")
            if last:
                node[int(part)] = yaml.safe_load(raw)
            node = node[int(part)]
        else:
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                node = node.setdefault(part, {})


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a KvtoolError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise KvtoolError(f"recipe {path} does not exist: give a YAML file (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise KvtoolError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise KvtoolError(f"recipe {path} must be a mapping with model, dataset, calibrate, steps")
    data = copy.deepcopy(data)
    for o in overrides or []:
        set_override(data, o)
    _check_keys(str(path), data, TOP_KEYS)
    dataset = {"source": "embedded", "samples": 16, "seq_len": 256, "seed": 0, "text_field": "text",
               **(data.get("dataset") or {})}
    _check_keys(f"{path}: dataset", dataset, DATASET_KEYS)
    calibrate = {"batch_size": 8, "device": "auto", "dtype": "float32", "stats": [], **(data.get("calibrate") or {})}
    _check_keys(f"{path}: calibrate", calibrate, CALIBRATE_KEYS)
    steps: list[Step] = []
    names: set[str] = set()
    for i, raw in enumerate(data.get("steps") or []):
        if not isinstance(raw, dict) or len(raw) != 1:
            raise KvtoolError(f"{path}: steps[{i}] must be a mapping with one key (care, corda, oscar, ladder, "
                              "validate or eval)")
        kind, opts = next(iter(raw.items()))
        opts = dict(opts or {})
        if kind in TRANSFORMS:
            name = opts.pop("name", kind)
            _check_keys(f"{path}: steps[{i}].{kind}", opts, transform_signature(kind))
            if name in names or name == "original":
                raise KvtoolError(f"{path}: steps[{i}] name {name!r} is already used: give each step a unique name")
            names.add(name)
        elif kind == "validate":
            _check_keys(f"{path}: steps[{i}].validate", opts, VALIDATE_KEYS)
            name = f"validate-{opts.get('target')}"
            if opts.get("target") not in names:
                raise KvtoolError(f"{path}: steps[{i}].validate target {opts.get('target')!r} is not an earlier "
                                  "transform step")
        elif kind == "eval":
            _check_keys(f"{path}: steps[{i}].eval", opts, EVAL_KEYS)
            opts.setdefault("targets", ["original"])
            for t in opts["targets"]:
                if t != "original" and t not in names:
                    raise KvtoolError(f"{path}: steps[{i}].eval target {t!r} is not 'original' or an earlier step")
            name = f"eval-{i}"
        else:
            raise KvtoolError(f"{path}: steps[{i}] has unknown kind {kind!r}: use care, corda, oscar, ladder, "
                              "validate or eval")
        steps.append(Step(kind, name, opts))
    if not steps:
        raise KvtoolError(f"{path}: no steps: add at least one step")
    return Recipe(path, data.get("model"), data.get("output"), dataset, calibrate, steps)


def required_stats(recipe: Recipe) -> tuple[str, ...]:
    """Union of the statistics every transform step needs (plus calibrate.stats), in canonical order."""
    from kvtool.calib.stats import ALL_STATS, parse_stats

    wanted = set(parse_stats(recipe.calibrate["stats"])) if recipe.calibrate["stats"] else set()
    for step in recipe.steps:
        if step.kind not in TRANSFORMS:
            continue
        if step.kind == "corda":
            from kvtool.convert.corda import parse_targets
            from kvtool.convert.corda import required_stats as corda_stats

            targets = parse_targets(step.options.get("targets"))
            wanted |= set(corda_stats(targets, step.options.get("mode", "kpa")))
        else:
            wanted |= set(importlib.import_module(TRANSFORMS[step.kind]).REQUIRED_STATS)
    return tuple(n for n in ALL_STATS if n in wanted)


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
        est["hidden_states"] = 4 * recipe.dataset["samples"] * recipe.dataset["seq_len"] * d
        params = spec.num_layers * (d * (hd + 2 * spec.num_kv_heads * spec.head_dim) + hd * d + 3 * d * i)
        est["model"] = 4 * (params + 2 * spec.vocab_size * d)
        est["total"] = sum(est.values())
    return {"model": recipe.model or "smollm2-135m", "dataset": recipe.dataset, "statistics": list(stats),
            "steps": [{"kind": s.kind, "name": s.name, "options": s.options} for s in recipe.steps],
            "estimated_peak_bytes": est}


def _stats_match(stats_dir: Path, model_hash: str, dataset: dict[str, Any], names: tuple[str, ...]) -> bool:
    from kvtool.calib.stats import MANIFEST_FILE

    try:
        manifest = json.loads((stats_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("model", {}).get("hash") == model_hash and manifest.get("recipe_dataset") == dataset
            and set(names) <= set(manifest.get("stats", [])))


def _load_target(name: str, out: Path, loaded: Any) -> Any:
    """The model an eval step scores: the source, or a step's output (CorDA: residual base + PEFT adapter)."""
    from kvtool.models import load_model

    if name == "original":
        return loaded
    folder = out / name
    if (folder / "adapter").is_dir() and (folder / "base").is_dir():
        from peft import PeftModel

        base = load_model(str(folder / "base"), strict=False)
        base.model = PeftModel.from_pretrained(base.model, str(folder / "adapter")).eval()
        return base
    if (folder / "config.json").is_file():
        return load_model(str(folder), strict=False)
    raise KvtoolError(f"step {name!r} wrote no model checkpoint to evaluate (OSCAR outputs are evaluated with "
                      "`kv_quant: <step>` on the original model)")


def run_recipe(recipe: Recipe, out: Path, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Execute a recipe into ``out``; returns the report (also written as report.json and report.md)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kvtool.calib import StatsStore, collect_statistics
    from kvtool.checkpoint import atomic_dir, write_json
    from kvtool.cli import resolve_device
    from kvtool.data import TextSource, calibration_windows, heldout_tokens
    from kvtool.evaluate import perplexity
    from kvtool.models import load_model
    from kvtool.validate import validate

    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(recipe.calibrate["device"])
    report: dict[str, Any] = {"recipe": str(recipe.path), "plan": plan(recipe, None), "steps": [], "perplexity": {}}
    t_all = time.perf_counter()
    loaded = load_model(recipe.model, dtype=recipe.calibrate["dtype"], device="cpu")
    report["plan"] = plan(recipe, loaded.spec)
    names = required_stats(recipe)
    ds = recipe.dataset
    stats_dir = out / "stats"
    store = None
    if names:
        t0 = time.perf_counter()
        if _stats_match(stats_dir, loaded.model_hash, ds, names):
            store = StatsStore.load(stats_dir)
            report["steps"].append({"kind": "calibrate", "name": "stats", "seconds": 0.0, "reused": True})
        else:
            windows = calibration_windows(loaded.tokenizer, TextSource(ds["source"], "calib", ds["text_field"]),
                                          ds["samples"], ds["seq_len"], ds["seed"], loaded.spec.max_positions)
            store = collect_statistics(loaded, windows, names, device=device,
                                       batch_size=recipe.calibrate["batch_size"], progress=progress)
            store.meta = {"model": loaded.identity(), "recipe_dataset": ds, "tokens": int(windows.numel()),
                          "dataset": {"dataset": ds["source"], "split": "calib", "samples": ds["samples"],
                                      "seq_len": ds["seq_len"], "seed": ds["seed"]}}
            with atomic_dir(stats_dir, overwrite=True) as tmp:
                store.save(tmp)
            report["steps"].append({"kind": "calibrate", "name": "stats", "seconds": time.perf_counter() - t0,
                                    "reused": False, "statistics": list(names), "tokens": int(windows.numel())})
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("recipe steps", total=len(recipe.steps))
        for step in recipe.steps:
            bar.update(task, description=f"{step.kind}: {step.name}")
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"kind": step.kind, "name": step.name}
            if step.kind in TRANSFORMS:
                module = importlib.import_module(TRANSFORMS[step.kind])
                kwargs = dict(step.options)
                if "device" in inspect.signature(getattr(module, f"write_{step.kind}")).parameters:
                    kwargs.setdefault("device", device)
                result = getattr(module, f"write_{step.kind}")(loaded, store, out / step.name, overwrite=True,
                                                               **kwargs)
                entry["report"] = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
            elif step.kind == "validate":
                entry["report"] = validate(out / step.options["target"], {"device": device})
                if not entry["report"].get("passed"):
                    raise KvtoolError(f"validation of {step.options['target']} failed: {entry['report']}")
            else:
                seq_len, max_tokens = step.options.get("seq_len", 512), step.options.get("max_tokens", 4096)
                for target in step.options["targets"]:
                    model = _load_target(target, out, loaded)
                    tokens = heldout_tokens(model.tokenizer or loaded.tokenizer, TextSource(split="heldout"),
                                            max_tokens)
                    kv = step.options.get("kv_quant")
                    if kv:
                        from kvtool.kvquant import eval_kv_quant

                        kv_arg = str(out / kv) if (out / kv).is_dir() else kv
                        res = eval_kv_quant(model, tokens, kv_arg, None, step.options.get("residual_window"),
                                            step.options.get("sink"), seq_len=seq_len)
                        key = f"{target} + kv {kv}"
                    else:
                        res = perplexity(model.model, tokens, seq_len, batch_size=step.options.get("batch_size", 4))
                        key = target
                    report["perplexity"][key] = res["perplexity"]
                    entry.setdefault("results", {})[key] = res["perplexity"]
            entry["seconds"] = time.perf_counter() - t0
            report["steps"].append(entry)
            bar.advance(task)
    report["seconds"] = time.perf_counter() - t_all
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report))
    return report


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
            bits += [f"ppl[{k}]={v:.3f}" for k, v in s["results"].items()]
        lines.append(f"| {s['name']} | {s['kind']} | {s.get('seconds', 0):.1f} | {', '.join(bits)} |")
    if report["perplexity"]:
        lines += ["", "| model | held-out perplexity |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in report["perplexity"].items()]
    return "\n".join(lines) + "\n"
