r"""CIFAR-10 ResNet population, the paper's recipe (SGD 0.9, cosine, L2 1e-4, batch 128, 300 ep).

Parameterised by depth (6n+2), width multiplier, residual connections, training-data fraction
and population size:

  python train.py --config configs/cifar10.py --workdir workdir/c10_r14_w1
  python train.py --config configs/cifar10.py:depth=62,width=1,size=10 --workdir workdir/c10_r62
  python train.py --config configs/cifar10.py:depth=14,width=4,fraction=0.125 \
      --workdir workdir/c10_r14_w4_f8
  python train.py --config configs/cifar10.py:depth=38,residual=false --workdir workdir/c10_nores
"""

from cka_jax.workdir.config import base_config, parse_arg

DEFAULTS = dict(depth=14, width=1.0, residual=True, fraction=1.0, size=1, seed=0, epochs=300, random_labels=False)


def cifar_config(dataset, arg):
    a = parse_arg(arg, DEFAULTS)
    c = base_config()
    c.data.name = dataset
    c.data.fraction = a["fraction"]
    c.data.random_labels = a["random_labels"]
    c.data.crop_padding = 4
    c.data.flip = True
    c.model.name = "cifar_resnet"
    c.model.depth = a["depth"]
    c.model.width = a["width"]
    c.model.residual = a["residual"]
    c.population.size = a["size"]
    c.population.seed = a["seed"]
    c.train.epochs = a["epochs"]
    c.train.batch_size = 128
    c.train.learning_rate = 0.1
    c.train.weight_decay = 1e-4
    c.train.eval_batch_size = 1000
    return c


def get_config(arg=None):
    return cifar_config("cifar10", arg)
