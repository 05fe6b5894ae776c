"""The MoE layer itself: config, router, capacity, dispatcher, all-to-all, aux losses, counters.

Kept import-free: import the submodules (``moe_parallel.core.<module>``).
"""
