"""What every MoE layer benchmark of ``benchmarks/`` shares.

- :mod:`.configs`: the shapes (``BenchConfig``), where and in what precision they run (``Target``),
  and the work a step does (kept rows, DeepSpeed's padded rows, expert-GEMM FLOPs);
- :mod:`.peers`: one forward+backward of each implementation on one shared problem: our layer,
  DeepSpeed's MoE, the DeepSpeed drop-in, the expert-GEMM floor and ``moved``;
- :mod:`.workers`: the processes an implementation runs in, driven by commands over a pipe;
- :mod:`.rounds`: interleaved timing rounds, their medians and ratios, and the interval of a median;
- :mod:`.report`: the machine line, number cells, and the writer of the results blocks of
  BENCHMARKS.md;
- :mod:`.procmem`: a process's resident memory and its high-water mark (standard library only).

The package imports nothing heavy itself: tools import the modules they use.
"""
