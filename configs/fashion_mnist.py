r"""Fashion-MNIST ResNet population: the paper's CIFAR recipe and arguments (configs/cifar10.py:
SGD 0.9, cosine, L2 1e-4, batch 128, learning rate 0.1, 300 epochs) on 28x28x1 images.

Data: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu/Colab), or the IDX files in
data.data_dir, or tensorflow-datasets' fashion_mnist (see cka_jax/data/fashion_mnist.py).

  python train.py --config configs/fashion_mnist.py --workdir workdir/fm_r14
  python train.py --config configs/fashion_mnist.py:depth=26,fraction=0.125,size=4,epochs=12 \
      --workdir workdir/fm_r26_f8

Images stay 28x28: padding them to 32x32 would keep the CIFAR stage sizes (32, 16, 8 instead of
28, 14, 7) but costs 1.31x the compute, and the models end in a global average pool either way.
Augmentation: a random crop of the reflect-padded image, shifted by up to 2 pixels (the garments
are centred and fill the frame, trousers and dresses top to bottom: a 4-pixel shift as on CIFAR
mirrors a tenth of a garment into view), and horizontal flips, which keep every class's label
(clothes, bags and shoes mirrored are still clothes, bags and shoes).
"""

from configs.common import cifar_recipe


def get_config(arg=None):
    c = cifar_recipe("fashion_mnist", arg)
    c.data.crop_padding = 2
    return c
