"""deltalens: see where fine-tuning changed a model.

The notebook API (`deltalens.worker.notebook`), loaded on first use so that `import deltalens`
stays cheap (no torch, no pandas, no plotly until a function is called)::

    import deltalens as dl
    r = dl.analyze("base/", "target/", taus=[1e-5, 1e-3])
    r.tensors                # a pandas DataFrame, one row per matrix
    r.heatmap("sparsity")    # a Plotly figure
    dl.open("results.duckdb")

The engine and the service are the subpackages `deltalens.worker` and `deltalens.backend`.
"""

__all__ = ["Analysis", "analyses", "analyze", "open", "overlap", "series"]


def __getattr__(name: str):
    if name in __all__:
        from deltalens.worker import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'deltalens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
