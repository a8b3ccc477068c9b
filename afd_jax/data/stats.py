"""Recommended normalisation constants: per-channel mean and std of the training split's pixels
scaled to [0, 1], for `config.dataset.mean` / `config.dataset.std` (TensorFlow-free).
"""
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # the official AFD recipe's constants
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)      # torchvision's; also for the transfer-learning sets
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.3054,)                    # `digits` train split (1,437 images)
DIGITS_STD = (0.3757,)
FASHION_MNIST_MEAN = (0.2860,)             # `fashion_mnist_local` train split (60,000 images)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_SCENES_MEAN = (0.2151,)      # `fashion_mnist_scenes` train split (10,000 scenes)
FASHION_MNIST_SCENES_STD = (0.2710,)
