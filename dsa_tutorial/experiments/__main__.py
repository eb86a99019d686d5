"""python -m dsa_tutorial.experiments NAME [NAME ...] | all | list   (see the package docstring)."""
from __future__ import annotations

import argparse
import sys

from . import EXPERIMENTS, GPU_SIZED, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsa_tutorial.experiments", description=__doc__)
    parser.add_argument("names", nargs="+", help=f"experiments to run: {', '.join(EXPERIMENTS)}, all, or list")
    parser.add_argument("--smoke", action="store_true", help="the same code at a size of seconds; writes nothing "
                                                             "unless --out is given")
    parser.add_argument("--out", default="default", help="directory of the JSON results (default book/data)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--no-cache", action="store_true", help="retrain every model instead of loading it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU-sized experiments: retrieval_* and "
                                                          "text; the others always run on the CPU; default cpu)")
    parser.add_argument("--jobs", type=int, default=1, help="runs (seeds) in parallel processes (the GPU-sized "
                                                            "experiments; default 1)")
    args = parser.parse_args(argv)
    width = max(map(len, EXPERIMENTS))
    if args.names == ["list"]:
        for name, (_, question) in EXPERIMENTS.items():
            print(f"{name:{width}s} {question}")
        return 0
    names = args.names
    if names == ["all"]:  # the GPU-sized experiments take a day each on a CPU: only with --device cuda
        names = [n for n in EXPERIMENTS if n not in GPU_SIZED or args.device != "cpu"]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    if set(names) & set(GPU_SIZED):  # a missing GPU is said before anything runs, not after an hour
        from .common import training_device

        training_device(args.device)
    for name in names:
        payload = run(name, smoke=args.smoke, out_dir=args.out, seeds=args.seeds, progress=not args.no_progress,
                      use_cache=not args.no_cache, device=args.device if name in GPU_SIZED else "cpu",
                      jobs=args.jobs if name in GPU_SIZED else 1)
        where = "not written" if payload.get("_path") is None and args.smoke and args.out == "default" else "written"
        print(f"{name}: {payload['seconds']} s ({where})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
