r"""ImageNet ResNet-50 populations (the paper's Sec. 5): base ResNet-50, deeper (stage 3 grown
from 6 to 17 bottleneck blocks: ResNet-83) or wider (stage 3 2.8x wider), streamed from
tensorflow-datasets' imagenet2012 (prepare it first; see the README).

  python train.py --config configs/imagenet_resnet50.py:base,size=8 --workdir workdir/in_base
  python train.py --config configs/imagenet_resnet50.py:deeper --workdir workdir/in_deeper
  python train.py --config configs/imagenet_resnet50.py:wider --workdir workdir/in_wider
"""

from cka_jax.workdir.config import base_config
from configs.common import parse_arg

# (stage_sizes, stage_widths): 3 convs per bottleneck block + stem + head = depth.
VARIANTS = {
    "base": ((3, 4, 6, 3), (1.0, 1.0, 1.0, 1.0)),
    "deeper": ((3, 4, 17, 3), (1.0, 1.0, 1.0, 1.0)),
    "wider": ((3, 4, 6, 3), (1.0, 1.0, 2.8, 1.0)),
}


def get_config(arg="base"):
    name, _, rest = (arg or "base").partition(",")
    if name not in VARIANTS:
        raise ValueError(f"imagenet_resnet50 takes one of {sorted(VARIANTS)}, got '{name}'")
    a = parse_arg(rest, dict(size=1, seed=0, epochs=90, fraction=1.0))
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.fraction = a["fraction"]
    c.data.image_size = 224
    c.model.name = "imagenet_resnet"
    c.model.stage_sizes, c.model.stage_widths = VARIANTS[name]
    c.model.dtype = "bfloat16"
    c.population.size = a["size"]
    c.population.seed = a["seed"]
    c.population.shared_data_order = True  # streamed batches are shared by the population
    c.train.epochs = a["epochs"]
    c.train.batch_size = 256
    c.train.learning_rate = 0.1
    c.train.warmup_epochs = 5.0
    c.train.weight_decay = 1e-4
    c.train.eval_batch_size = 250
    c.train.prediction_dtype = "float16"  # 50k x 1000 logits per model
    c.checkpoint.every_steps = 1000
    return c
