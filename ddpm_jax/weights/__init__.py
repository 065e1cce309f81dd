"""Weights in other formats: one layout-mapping engine (``layout``) and a module per format
(``diffusers``). ``python -m ddpm_jax.import_weights`` and ``python -m ddpm_jax.export_weights``
are the commands over them."""
