"""Benchmark suites: each module defines ``cases(device, quick) -> list[BenchCase]``.

``comms`` defines none: it reports bytes communicated per token by a vocabulary-parallel head
(analytic for real heads, and counted on gloo), not timings, so ``fastalign bench`` leaves it out;
run it with ``fastalign bench --suite comms``.

``step`` (whole GRPO / DPO / PPO training steps on a model built from a config) is ``OPT_IN``:
``fastalign bench`` runs it only when named (``--suite step``). It also defines
``report(results, device, info, out_dir, ...)``, which ``fastalign bench`` calls after the run: its own
table (tokens/s, the planner against measurement, the largest micro-batch on CUDA)."""
