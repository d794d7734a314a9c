r"""CIFAR-100 ResNet population; same recipe and arguments as configs/cifar10.py.

python train.py --config configs/cifar100.py:depth=26,width=2,size=8 --workdir workdir/c100
"""

from configs.common import cifar_recipe


def get_config(arg=None):
    return cifar_recipe("cifar100", arg)
