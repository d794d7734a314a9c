r"""CIFAR-100 ResNet population; same recipe and arguments as configs/cifar10.py.

python train.py --config configs/cifar100.py:depth=26,width=2,size=8 --workdir workdir/c100
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar10 import cifar_config  # noqa: E402


def get_config(arg=None):
    return cifar_config("cifar100", arg)
