"""Registration point for kvtool's own model classes (converted checkpoints) with transformers' Auto classes.

Each converted format (MLA, ladder) adds its config/model classes here as it lands; importing this module
registers them, so ``AutoModelForCausalLM.from_pretrained(out)`` works after ``import kvtool``.
"""

KVTOOL_MODEL_TYPES: tuple[str, ...] = ()
