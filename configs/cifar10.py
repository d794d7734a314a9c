r"""CIFAR-10 ResNet population, the paper's recipe (SGD 0.9, cosine, L2 1e-4, batch 128, 300 ep).

Parameterised by depth (6n+2), width multiplier, residual connections, training-data fraction
and population size:

  python train.py --config configs/cifar10.py --workdir workdir/c10_r14_w1
  python train.py --config configs/cifar10.py:depth=62,width=1,size=10 --workdir workdir/c10_r62
  python train.py --config configs/cifar10.py:depth=14,width=4,fraction=0.125 \
      --workdir workdir/c10_r14_w4_f8
  python train.py --config configs/cifar10.py:depth=38,residual=false --workdir workdir/c10_nores
"""

from configs.common import cifar_recipe


def get_config(arg=None):
    return cifar_recipe("cifar10", arg)
