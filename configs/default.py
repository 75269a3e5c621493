r"""Any registered method on any preset, for methods without a config file of their own.

COMMAND:
  python experiments/train.py --config=configs/default.py:digits,method=supcon --workdir=runs/x
  python experiments/train.py --config=configs/default.py:digits,method=my_pkg.my_method --workdir=runs/y
The argument is PRESET,method=NAME[,encoder=NAME]; NAME is a registered method or the module path of
one (docs/ADDING_A_METHOD.md). On digits and fashion_mnist the shared CPU recipe trains it; elsewhere
the base config's values apply, each overridable with --config.<field>=<value>.
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config(None, arg)
