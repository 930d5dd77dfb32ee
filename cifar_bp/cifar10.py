"""Facts about CIFAR-10 that several modules need, in one torch-free place."""

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NUM_CLASSES = len(CLASSES)  # the network's outputs
SIDE = 32  # images are SIDE×SIDE pixels
CHANNELS = 3  # RGB
# Training-set channel statistics on the 0..1 scale, for normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
