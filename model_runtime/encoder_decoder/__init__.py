"""Encoder-decoder models (T5 and BART families): the runner's view of one
(``step``: encode at admission, the decoder step, the cache shape), each
family's decoder step forward over the flat batch (``t5``, ``bart``) and the
cross-attention both read their sources through (``cross_attention``)."""
