r"""Supervised baseline: the same encoder trained with softmax cross-entropy on the labels.

COMMAND:
  python experiments/train.py --config=configs/supervised.py:digits --workdir=runs/supervised_digits
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet (or any registered dataset); append
,encoder=NAME to change the encoder. Each preset uses the same data, augmentation, optimizer and
number of steps as the self-supervised presets, so its rows in the README compare like with like.
The head is a linear classifier (config.projector.hidden_dims = ()); out_dim is the class count.
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("supervised", arg, RECIPES, common=_linear_head)


def _linear_head(c):
    c.projector.hidden_dims = ()       # a linear classifier on the encoder's features
    c.projector.use_bn = False
    c.loss.label_smoothing = 0.0       # plain cross-entropy


def _imagenet(c):
    c.batch_size = 1024                # Goyal et al. 2017: lr 0.1 x B/256 with SGD momentum 0.9
    c.num_epochs = 90.0                # Goyal et al. 2017 / He et al. 2016: 90 epochs
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.lr_scaling = "linear"
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4    # He et al. 2016, sec. 3.4
    c.optimizer.warmup_epochs = 5.0    # Goyal et al. 2017, sec. 2.2 (gradual warmup, 5 epochs)
    c.checkpoint.every_steps = 2500


RECIPES = {"imagenet": _imagenet}
