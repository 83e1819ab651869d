"""Request lifecycle, block accounting, scheduling and the DynamicBatcher loop.

Pure Python: this package never imports torch or fastapi. Tensors live in
``model_runtime``; HTTP lives in ``server``. Messages to and from the runner are
plain frozen dataclasses (see ``batching.messages``).
"""
