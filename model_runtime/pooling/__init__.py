"""Pooling models (embedders): how a checkpoint pools (``config``), loading
one (``model``) and the runner that answers pooling requests (``runner``)."""
