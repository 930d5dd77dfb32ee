"""`make bench`: the throughput benchmark, exactly `cifar-bp bench` (it takes the same options).

python benchmarks/throughput.py --variants a,b,c,d       # tutorial, engine, fastest, default
python benchmarks/throughput.py --device cuda --variants a,c,c@2048,d --json

Each variant's images/s comes with its GFLOP/s and share of the matmul peak, measured in the
same run, for the first epoch and the steady state. benchmarks/gpu_check.sh runs more.
"""

import sys

from cifar_bp.cli import main

if __name__ == "__main__":  # the guard matters: each variant's process re-imports this file
    sys.argv[1:1] = ["bench"]
    main()
