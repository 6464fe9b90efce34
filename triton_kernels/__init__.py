"""Triton kernels of the ``triton`` backend (``tvlars_fused/_triton_backend.py``), shipped as
``tvlars_fused.triton_kernels``: ``lars`` (LARS and TVLARS) and ``lamb``, two passes each over the shared layer
table, with their device helpers in ``common``."""
