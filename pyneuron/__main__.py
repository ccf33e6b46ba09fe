"""The ``pyneuron`` command (the full CLI arrives with the demo and report issue)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyneuron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in demo (not implemented yet)")
    sub.add_parser("info", help="show version, SIMD level and threads")
    args = parser.parse_args(argv)
    import pyneuron

    if args.command == "info":
        print(f"pyneuron {pyneuron.__version__}")
        print(
            f"SIMD level: {pyneuron.simd_level()} "
            f"(available: {', '.join(pyneuron.available_simd_levels())})"
        )
        print(f"threads: {pyneuron.num_threads()}")
        return 0
    print(
        "pyneuron demo: not implemented yet. The engine is ready (see README: "
        "pyneuron.explain); the built-in demo (synthetic data, small CNN, HTML report) "
        "is tracked as a separate issue. Run `pyneuron info` to check the install.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
