"""Which encoder-decoder models tokenstep serves: each model type's family,
the decoder step forward that serves it (``t5``, ``bart``)."""

# model_type -> family: the step forward that serves it.
FAMILIES = {"t5": "t5", "mt5": "t5", "bart": "bart", "mbart": "bart", "marian": "bart"}


def family_of(config: object) -> str | None:
    """The encoder-decoder family of a model config, None for a decoder-only
    model; raises ``ValueError`` for an encoder-decoder model of another kind."""
    if not getattr(config, "is_encoder_decoder", False):
        return None
    model_type = getattr(config, "model_type", "?")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{model_type!r} is an encoder-decoder model tokenstep does not serve: it serves decoder-only "
            f"causal LMs and the encoder-decoder families T5 (t5, mt5) and BART (bart, mbart, marian)"
        )
    return FAMILIES[model_type]
