"""Attention, tokenstep's side of it: the function transformers' models call
(``interface``: ``paged_attention_forward`` under the registered name, the
per-layer ``LayerFeatures`` it honours, the step slot for models that drop
the kwargs), the step's block tables and spans (``context``), the same as one
tensor for the C++ step op and the compiled graph (``metadata``), and the
load-time check that a model's attention reaches all of it exactly
(``check``, proven by ``probe``)."""
