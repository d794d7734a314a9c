r"""Default run: a population of 4 ResNet-14 (1x) on scikit-learn's bundled digits (8x8).

Works offline in 2-3.5 minutes on 2 CPU cores (98.75% test accuracy). It shows the pipeline:
digits is too easy for the paper's width/depth findings (use configs/cifar10.py for those).

  python train.py                                  # this config, into workdir/default
  python train.py --config configs/digits.py --workdir workdir/digits_r14
  python train.py --config configs/digits.py:depth=56,warmup=5 --workdir workdir/digits_r56
"""

from cka_jax.workdir.config import base_config
from configs.common import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(depth=14, width=1.0, residual=True, fraction=1.0, size=4, epochs=24, warmup=0.0))
    c = base_config()
    c.data.name = "digits"
    c.data.fraction = a["fraction"]
    c.data.crop_padding = 1  # 8x8 images: a one-pixel jitter
    c.data.flip = False  # a mirrored digit is another glyph
    c.model.name = "cifar_resnet"
    c.model.depth = a["depth"]
    c.model.width = a["width"]
    c.model.residual = a["residual"]
    c.population.size = a["size"]
    c.train.epochs = a["epochs"]
    c.train.warmup_epochs = a["warmup"]
    c.train.batch_size = 128
    c.train.learning_rate = 0.1
    return c
