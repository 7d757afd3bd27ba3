"""The ``coremap`` command: ``demo``, ``info``, ``cache`` (and ``bench`` when installed)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from coremap import _info

    _info.show()
    return 0


def _cache(args) -> int:
    from coremap._kernels import _diskcache

    if args.action == "clear":
        print(f"clearing {_diskcache.describe()}")
        _diskcache.clear_cache()
    else:
        print(_diskcache.describe())
    return 0


def _demo(args) -> int:
    from coremap import _demo

    rows = _demo.run(n_w2=args.n_w2, n_w3=args.n_w3, repeat=args.repeat)
    return 0 if all(r["ok"] for r in rows) else 1


def _bench(args) -> int:
    from coremap import _bench

    workloads = args.workload or list(_bench.WORKLOADS)
    unknown = [w for w in workloads if w not in _bench.WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {unknown}; choose from {list(_bench.WORKLOADS)}",
              file=sys.stderr)
        return 2
    rows = _bench.run(workloads, quick=args.quick)
    if args.json:
        _bench.to_json(rows, args.json)
    if args.plot:
        _bench.plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from coremap import __version__

    parser = argparse.ArgumentParser(
        prog="coremap", description="Element-wise work over NumPy arrays on every core."
    )
    parser.add_argument("--version", action="version", version=f"coremap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run W2 and W3 with NumPy and with coremap, and compare")
    p.add_argument("--n-w2", type=int, default=20_000_000, help="elements for W2")
    p.add_argument("--n-w3", type=int, default=1_000_000, help="elements for W3 sorted")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats (median)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("bench", help="the workloads defined in docs/benchmarks.rst, "
                       "head to head with the peers")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    from coremap._bench import WORKLOADS

    p.add_argument("--workload", action="append",
                   help=f"one of {', '.join(WORKLOADS)} (repeatable; default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the table as a bar chart")
    p.set_defaults(run=_bench)
    p = sub.add_parser("info", help="cores, engines, Numba, shared memory, optional backends")
    p.set_defaults(run=_info)
    p = sub.add_parser("cache", help="where compiled kernels are cached, and how big; 'clear'")
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show")
    p.set_defaults(run=_cache)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
