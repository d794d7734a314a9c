"""The data sets runs train and analyses read: digits (bundled), Fashion-MNIST, CIFAR-10/100 and
ImageNet (tfds). :mod:`~cka_jax.data.datasets` holds their facts and loaders,
:mod:`~cka_jax.data.fashion_mnist` reads IDX files, :mod:`~cka_jax.data.tfds_data` reads tfds
sources from a location that is used or refused, never replaced. Importing this package loads
nothing heavy; jax and numpy come with ``datasets``, tensorflow-datasets on first use.
"""
