"""Training utilities: metrics and regional (per-block) compilation.

Kept import-free: import the submodules (``moe_parallel.training.<module>``).
"""
