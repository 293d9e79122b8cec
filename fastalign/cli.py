"""The ``fastalign`` command.

``fastalign bench``: run the benchmark suites on the device that is there (CUDA if available,
otherwise CPU), print the comparison table, and write JSON + markdown under benchmarks/results/.
``fastalign plan``: the per-device memory of an RL step, with and without fastalign (fastalign.plan).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "fastalign bench: TRITON_INTERPRET=1 is set; the CPU benchmarks time the torch path and are "
            "unaffected, but unset it to benchmark real kernels on a GPU.",
            file=sys.stderr,
        )
    import torch

    from fastalign.bench.core import discover_suites, run_cases
    from fastalign.bench.report import console_table, machine_info, machine_line, write_results

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # speed ratios on a shared CPU: one thread, or a busy neighbour core is what gets measured
        torch.set_num_threads(args.threads)
    if args.suite and "comms" in args.suite:  # bytes per token, not timings: the suite's own report
        from fastalign.bench.suites import comms

        rc = comms.main([] if args.no_write else ["--out", str(Path(args.out) / "comms")])
        args.suite = [s for s in args.suite if s != "comms"]
        if rc or not args.suite:
            return rc
    suites = discover_suites()
    if args.suite:
        unknown = sorted(set(args.suite) - set(suites))
        if unknown:
            print(f"fastalign bench: unknown suite(s) {unknown}; available: {sorted(suites)}", file=sys.stderr)
            return 2
        suites = {k: v for k, v in suites.items() if k in args.suite}
    else:  # suites marked OPT_IN (the step suite: whole models, minutes) run only when named
        suites = {k: v for k, v in suites.items() if not getattr(v, "OPT_IN", False)}
    cases = []
    for name, mod in suites.items():
        cases.extend(mod.cases(device, quick=args.quick))
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    if args.list:
        for c in cases:
            print(c.name)
        return 0
    info = machine_info(device)
    print(f"fastalign bench on {machine_line(info)}: {len(cases)} cases", flush=True)
    results = run_cases(cases, device, progress=not args.no_progress, budget_s=args.budget)
    print(console_table(results))
    if not args.no_write:
        json_path, md_path = write_results(results, info, Path(args.out), tag=args.tag)
        print(f"wrote {json_path} and {md_path}")
        if not args.no_plot:
            try:
                from fastalign.bench.plot import plot_results

                png = plot_results(results, info, Path(args.out), tag=args.tag)
                if png:
                    print(f"wrote {png}")
            except ImportError as exc:  # matplotlib is in the bench extra
                print(f"(no plot: {exc})")
    for name, mod in suites.items():  # a suite's own table (the step suite: tokens/s, planner, max tokens)
        if hasattr(mod, "report") and any(r.suite == name for r in results):
            mod.report(results, device, info, None if args.no_write else Path(args.out), tag=args.tag, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suites and print/write the comparison")
    b.add_argument("--suite", action="append", help="run only this suite (repeatable)")
    b.add_argument("--filter", help="run only cases whose name contains this string")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--quick", action="store_true", help="smallest shapes only (smoke test)")
    b.add_argument("--out", default="benchmarks/results", help="directory for JSON / markdown / plot")
    b.add_argument("--tag", help="file name stem for the results (default: the device name)")
    b.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case (after warm-up)")
    b.add_argument("--threads", type=int, default=1, help="CPU threads for the CPU benchmarks (default 1)")
    b.add_argument("--list", action="store_true", help="list the cases and exit")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--no-write", action="store_true")
    b.add_argument("--no-plot", action="store_true")
    b.set_defaults(func=_bench)
    sub.add_parser(
        "check-kernels",
        add_help=False,
        help="compile the kernels that run (as their representative launches specialize them) "
        "for sm_80 / sm_90 without a GPU; report registers, spills, shared memory and "
        "occupancy; fail on spills (options: see `fastalign check-kernels --help`)",
    )
    sub.add_parser(
        "plan",
        add_help=False,
        help="per-device memory of an RL step (GRPO / PPO / DPO) by part, with and without fastalign; the "
        "largest micro-batch and the fewest devices (options: see `fastalign plan --help`)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plan":
        from fastalign.plan import main as plan_main

        return plan_main(argv[1:])
    if argv and argv[0] == "check-kernels":
        from fastalign.kernels.aot import main as check_kernels

        return check_kernels(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
