"""`python -m cifar_bp` (and `torchrun -m cifar_bp`) run the same CLI as `cifar-bp`."""

from cifar_bp.cli import main

if __name__ == "__main__":
    main()
