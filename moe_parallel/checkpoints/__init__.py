"""Checkpoints: save/load, the on-disk store, migration of old formats, safe file loading.

Kept import-free: import the submodules (``moe_parallel.checkpoints.<module>``).
"""
