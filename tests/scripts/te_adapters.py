"""Attaching an adapter to a transformers text encoder in tests, on any transformers release."""

from peft import inject_adapter_in_model


def add_te_adapter(text_encoder, config) -> None:
    """transformers' ``add_adapter``, as users and diffusers' training scripts call it; where this
    transformers refuses the installed PEFT (5.24.0 wants PEFT >= 0.22: a ``make test-latest`` run),
    PEFT's ``inject_adapter_in_model``, which ``add_adapter`` wraps and the training script uses
    (README: text-encoder adapters go through PEFT). ``tests/test_install.py`` checks both agree."""
    try:
        text_encoder.add_adapter(config)
    except ValueError as e:
        if "version of PEFT" not in str(e):
            raise
        inject_adapter_in_model(config, text_encoder)
