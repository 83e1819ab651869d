"""From a path to a ``LoadedModel``: transformers' loading with tokenstep's
attention registered, weight forms, the load-time attention check
(``loader``), and the embedded default model (``default_model``)."""
