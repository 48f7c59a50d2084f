"""``kvtool export-gguf``: a checkpoint as one GGUF file for llama.cpp, written by kvtool's own writer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvtool.commands.options import MODEL_HELP

GGUF_FILE = "model.gguf"  # kvtool.convert.gguf_export.GGUF_FILE (not imported at CLI start-up)

def export_gguf_(
    model: Annotated[str, typer.Argument(help=MODEL_HELP + " A convert-mla --format deepseek-v3 output (healed or "
                                         "not) becomes llama.cpp's deepseek2; a Llama source stays llama.")],
    output: Annotated[Path, typer.Option("-o", "--output", help=f"Output folder (written atomically): {GGUF_FILE} "
                                                               "and kvtool.json.")],
    out_type: Annotated[str, typer.Option("--type", help="Matrix type: f16, bf16 or f32 (norms and 1-D tensors "
                                                          "are always f32).")] = "f16",
    pre_tokenizer: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--pre-tokenizer", help="llama.cpp's pre-tokenizer name (default: read from tokenizer.json: gpt-2, smollm "
                                "or llama-bpe).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder that kvtool "
                                                                 "wrote.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Write a checkpoint as GGUF (llama.cpp) with kvtool's writer on the `gguf` package: no llama.cpp checkout.

    A DeepSeek-V3 export keeps its MLA latent cache in llama.cpp (deepseek2); q_lora_rank null is written as
    q_lora_rank 0, which llama.cpp loads as a plain q_proj for any layer count. Examples:
      kvtool convert-mla smollm2-135m --format deepseek-v3 --kv-ratio 0.5 -o out/mla-ds
      kvtool export-gguf out/mla-ds -o out/mla-ds-gguf        # out/mla-ds-gguf/model.gguf
      kvtool export-gguf smollm2-135m -o out/smollm2-f16      # the original, f16
    """
    import json

    from kvtool.checkpoint import atomic_dir, check_output_dir, provenance
    from kvtool.commands.console import print_json, print_table
    from kvtool.convert.gguf_export import OUT_TYPES, source_pre_tokenizer, write_gguf
    from kvtool.errors import KvtoolError
    from kvtool.models import resolve_model_path

    if out_type not in OUT_TYPES:
        raise KvtoolError(f"unknown --type {out_type!r}: use {', '.join(OUT_TYPES)}")
    check_output_dir(output, overwrite)
    directory, source, digest = resolve_model_path(model)
    if directory is None:
        raise KvtoolError(f"export-gguf reads a local checkpoint folder, not hub id {model!r}: download it first or "
                          "give the folder")
    pre = pre_tokenizer or source_pre_tokenizer(Path(directory), source)
    with atomic_dir(output, overwrite, (directory,)) as tmp:
        report = write_gguf(Path(directory), tmp / GGUF_FILE, out_type, pre, name=Path(source).name)
        manifest = provenance("export-gguf", {"type": out_type, "pre_tokenizer": pre_tokenizer},
                              {"source": source, "hash": digest}, None, report)
        (tmp / "kvtool.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if as_json:
        print_json(report)
        return
    print_table(f"export-gguf -> {output / GGUF_FILE}", ["architecture", "layers", "tensors", "MiB", "q_lora_rank",
                                                          "pre-tokenizer"],
                [[report["architecture"], str(report["layers"]), str(report["tensors"]),
                  f"{report['file_bytes'] / 2**20:.1f}", str(report["q_lora_rank"]), report["pre_tokenizer"]]])

