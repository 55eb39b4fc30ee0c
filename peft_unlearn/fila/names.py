"""Module names shared by the Fisher statistics, the init and the saved FILA state."""

from __future__ import annotations

__all__ = ["normalize_module_name"]


def normalize_module_name(name: str) -> str:
    """Map a module name inside a PeftModel to the name of the same module in the plain base model.

    ``base_model.model.model.layers.0.mlp.up_proj.base_layer`` -> ``model.layers.0.mlp.up_proj``. Fisher
    statistics and saved FILA state use these names so that they work before and after ``get_peft_model``.

    Args:
        name: A name from ``named_modules()`` of a PeftModel or of the plain model.

    Returns:
        The plain-model name.

    Examples:
        >>> normalize_module_name("base_model.model.model.layers.0.mlp.up_proj.base_layer")
        'model.layers.0.mlp.up_proj'
    """
    prefix = "base_model.model."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return ".".join(part for part in name.split(".") if part != "base_layer")
