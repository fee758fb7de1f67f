"""Functions that vLLM runs next to the model through ``LLM.apply_model``.

They live in their own importable module: vLLM ships them to the worker by reference, and a
function defined in ``__main__`` (the runner, started with ``python -m``) cannot be found there.
"""


def mirage_status(model) -> dict | None:
    # None: our model class was not used (another architecture, or the plugin did not load).
    return getattr(model, "mirage_status", None)
