"""End-to-end scripts over volcnn: the demo and the performance benchmark with its sections.

Run them as modules from the repository root, e.g. ``python -m pipelines.demo`` or ``python -m pipelines.benchmark
--sections scaling``; import a section as ``from pipelines import bench_train``. This package is not part of the
installed ``volcnn`` distribution: it lives in the repository only.
"""
