"""`make bench`: the throughput benchmark, exactly `cifar-bp bench` (it takes the same options).

python benchmarks/throughput.py                      # (a) tutorial, (b) engine, (c) fastest
python benchmarks/throughput.py --device cuda --json
"""

import sys

from cifar_bp.cli import main

if __name__ == "__main__":  # the guard matters: each variant's process re-imports this file
    sys.argv[1:1] = ["bench"]
    main()
