"""Model names read from files (a graph, a coder's ``cfg.json``, a peer's ``config.yaml``).

Such a file may come from someone else, so the name in it never decides on its own what gets
downloaded or imported: it is used only when it names a model that is already here (the
default model, another known local model, an existing local folder or ``.gguf`` file).
Anything else needs the user to pass ``--model`` themselves.
"""

from __future__ import annotations

from .loading import ModelLoadError, canonical_model_name, is_known_local_model


def model_from_file(name: str | None, where: str) -> str:
    """The model to load for a name read from a file described by ``where``.

    Returns:
        the canonical name, when ``name`` is a known local model.

    Raises:
        ModelLoadError: ``name`` is empty or not a known local model; the message says to pass
            ``--model``.
    """
    if name and is_known_local_model(name):
        return canonical_model_name(name)
    if not name:
        raise ModelLoadError(f"{where} name no model; pass --model with the model they belong to.")
    raise ModelLoadError(
        f"{where} name the model {name!r}, which is not a known local model; a model named in a file is never "
        f"downloaded or imported on the file's say-so. Pass --model {name} to load it if you trust it "
        "(or --model with the model they belong to).")
