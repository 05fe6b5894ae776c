"""DeepSpeed integration: everything moe_parallel does with DeepSpeed lives here.

- :mod:`.deepspeed`: DeepSpeed's primitives as the library uses them (``init_distributed``, expert
  groups, expert-parameter marks, whole values of ZeRO-partitioned parameters for checkpoints).
- :mod:`.engine`: ``build_engine``, ``deepspeed.initialize`` for a model holding MoE layers.
- :mod:`.parallel`: the pipeline / expert / data-parallel process groups.
- :mod:`.pipeline`: the models as ``deepspeed.pipe.PipelineModule`` (``gpt_pipeline``,
  ``decoder_pipeline``) and the names between a pipeline and its plain model.
- :mod:`.compat`: the DeepSpeed drop-in ``MoE`` (public as ``moe_parallel.compat``).

No other module of moe_parallel imports DeepSpeed, and these import it only inside the functions
that need it: ``import moe_parallel`` (and its models, checkpoints, planners) does not load it.
Kept import-free: import the submodules (``moe_parallel.integration.<module>``).
"""
