"""cifar-bp: train a small CNN on CIFAR-10 and make backpropagation visible."""

__version__ = "0.1.0"
