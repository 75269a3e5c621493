r"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction").

COMMAND:
  python experiments/train.py --config=configs/barlow_twins.py:digits --workdir=runs/bt_digits
  python experiments/train.py --config=configs/barlow_twins.py:imagenet --workdir=gs://bucket/bt
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet; append ,encoder=NAME to change the encoder.
Note: the official recipe uses a separate learning rate for biases and BN parameters (0.0048);
clrjax uses one learning rate and excludes those parameters from LARS adaptation and weight decay.
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("barlow_twins", arg, RECIPES)


def _digits(c):
    presets.apply_cpu_recipe(c, "digits")
    c.loss.lambd = 1 / 256             # off-diagonal weight ~1/d (Tsai et al. 2021 suggest 1/d)
    c.projector.hidden_dims = (512,)   # BT uses wide projectors; scaled to the 8x8 task
    c.projector.out_dim = 256          # embedding dimension d


def _fashion_mnist(c):
    presets.apply_cpu_recipe(c, "fashion_mnist")
    c.loss.lambd = 1 / 256             # ~1/d, as on digits
    c.projector.hidden_dims = (512,)
    c.projector.out_dim = 256


def _cifar(c):
    c.loss.lambd = 0.0051              # BT sec. 4 / official code: lambda = 5.1e-3
    c.batch_size = 256                 # solo-learn CIFAR recipe (BT paper gives none for CIFAR)
    c.num_epochs = 1000.0              # solo-learn CIFAR recipe
    c.projector.hidden_dims = (2048, 2048)  # solo-learn CIFAR: 3-layer 2048-wide projector
    c.projector.out_dim = 2048
    c.optimizer.name = "lars"
    c.optimizer.lr = 0.3               # solo-learn CIFAR recipe
    c.optimizer.lr_scaling = "linear"  # lr * batch / 256
    c.optimizer.weight_decay = 1e-4    # solo-learn CIFAR recipe
    c.optimizer.warmup_epochs = 10.0
    c.checkpoint.every_steps = 2000


def _imagenet(c):
    c.loss.lambd = 0.0051              # BT sec. 4: lambda = 5.1e-3
    c.batch_size = 2048                # BT sec. 4: batch 2048
    c.num_epochs = 1000.0              # BT sec. 4: 1000 epochs
    c.projector.hidden_dims = (8192, 8192)  # BT sec. 4: three linear layers of 8192
    c.projector.out_dim = 8192
    c.optimizer.name = "lars"          # BT sec. 4: LARS
    c.optimizer.lr = 0.2               # BT sec. 4: lr 0.2 for weights, x batch/256
    c.optimizer.lr_scaling = "linear"  # BT official code: lr = 0.2 * batch_size / 256
    c.optimizer.weight_decay = 1.5e-6  # BT sec. 4
    c.optimizer.warmup_epochs = 10.0   # BT sec. 4
    c.optimizer.end_lr = 0.0           # BT decays to 1/1000 of the peak; ~0 here
    c.checkpoint.every_steps = 2500


RECIPES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar,
           "cifar100": _cifar, "imagenet": _imagenet}
