"""Weights in other formats, by format: one layout-mapping engine (``layout``), the diffusers
format both ways (``diffusers``), the original TF checkpoints (``tf``), the Hugging Face Hub
(``hub``), the one PyTorch reader (``pytorch``), and our checkpoints to and from them
(``checkpoint``). ``python -m ddpm_jax.import_weights`` and ``python -m ddpm_jax.export_weights``
are the commands over them."""
