"""DeepSpeed integration: engine construction, the DeepSpeed drop-in, process groups.

Kept import-free: import the submodules (``moe_parallel.integration.<module>``).
"""
