r"""Layer identification (Kornblith et al. 2019, Table 2): a population of Tiny-10 networks on
Fashion-MNIST, one per seed, for `analyze.py --analyses layer_identification`.

  python train.py --config configs/layer_identification.py --workdir workdir/tiny10_fm
  python train.py --config configs/layer_identification.py:fraction=0.1,epochs=4 --workdir workdir/tiny10_fm

Arguments: size (models, default 10, the paper's), fraction (of the 60,000 training images),
epochs, seed (population seed), width (channel multiplier of Tiny-10). The recipe is the CIFAR
one of configs/common.py (SGD 0.9, cosine, L2 1e-4, batch 128, learning rate 0.1) with
Fashion-MNIST's augmentation (configs/fashion_mnist.py: 2-pixel crops, flips).
"""

from configs.common import cifar_recipe, parse_arg

ARGS = dict(size=10, fraction=1.0, epochs=10, seed=0, width=1.0)


def get_config(arg=None):
    a = parse_arg(arg, ARGS)
    c = cifar_recipe(
        "fashion_mnist", f"size={a['size']},fraction={a['fraction']},epochs={a['epochs']},seed={a['seed']}"
    )
    c.data.crop_padding = 2
    c.model.name = "tiny10"
    c.model.width = a["width"]
    c.model.residual = False
    return c
