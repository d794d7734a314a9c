r"""The paper's population pair (Fig. 7): 100 ResNet-62 (1x) vs 100 ResNet-14 (2x) on CIFAR-10.

Two runs, one per architecture; compare their predictions/test.npz with analyze.py:

  python train.py --config configs/paper_pairs.py:deep --workdir workdir/pairs_deep
  python train.py --config configs/paper_pairs.py:wide --workdir workdir/pairs_wide

Options after the name: size (default 100), epochs (default 300), e.g. `deep,size=16`.
"""

from configs.common import cifar_recipe

ARCHITECTURES = {"deep": "depth=62,width=1", "wide": "depth=14,width=2"}


def get_config(arg="deep"):
    name, _, rest = (arg or "deep").partition(",")
    if name not in ARCHITECTURES:
        raise ValueError(f"paper_pairs takes one of {sorted(ARCHITECTURES)}, got '{name}'")
    options = dict(size=100)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = value
    return cifar_recipe("cifar10", ",".join([ARCHITECTURES[name]] + [f"{k}={v}" for k, v in options.items()]))
