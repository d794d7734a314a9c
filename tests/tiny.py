"""The tiny training runs the tests use: ResNet-8 populations on 144 digits, 4 steps per epoch."""
from cka_jax.run_config import base_config


def tiny_config(size=2, epochs=1, *, width=0.25, strategy="loop", eval_batch_size=180, milestones=None,
                **train):
    """A run config: `size` ResNet-8 (`width`×) on a 0.1 fraction of digits (144 train images) in
    batches of 32 (4 steps per epoch); `train` sets further train.* fields; `milestones` sets
    checkpoint.keep_at_fractions."""
    c = base_config()
    c.data.fraction, c.data.crop_padding, c.data.flip = 0.1, 1, False
    c.model.depth, c.model.width = 8, width
    c.population.size, c.population.strategy = size, strategy
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = epochs, 32, eval_batch_size
    for name, value in train.items():
        c.train[name] = value
    if milestones is not None:
        c.checkpoint.keep_at_fractions = milestones
    return c
