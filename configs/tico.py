r"""TiCo (Zhu et al. 2022, "TiCo: Transformation Invariance and Covariance Contrast").

COMMAND:
  python experiments/train.py --config=configs/tico.py:digits --workdir=runs/tico_digits
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet; append ,encoder=NAME to change the encoder.
The running covariance (loss state) is saved in every checkpoint and restored on resume.
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("tico", arg, RECIPES, common=_loss_defaults)


def _loss_defaults(c):
    c.loss.beta = 0.9                  # TiCo: covariance momentum beta = 0.9
    c.loss.rho = 8.0                   # lightly's TiCoLoss default; the paper's value per TiCo-pytorch's --rho help


def _digits(c):
    presets.apply_cpu_recipe(c, "digits")
    c.projector.hidden_dims = (512,)   # scaled-down TiCo projector
    c.projector.out_dim = 128          # embedding dimension d (cov is d x d)


def _fashion_mnist(c):
    presets.apply_cpu_recipe(c, "fashion_mnist")
    c.projector.hidden_dims = (512,)
    c.projector.out_dim = 128


def _cifar(c):
    c.batch_size = 512
    c.num_epochs = 1000.0
    c.projector.hidden_dims = (4096,)  # TiCo reference implementations: 4096 hidden
    c.projector.out_dim = 256          # TiCo reference implementations: final_dim 256
    c.optimizer.name = "lars"
    c.optimizer.lr = 0.3
    c.optimizer.lr_scaling = "linear"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_epochs = 10.0
    c.checkpoint.every_steps = 2000


def _imagenet(c):
    c.loss.rho = 20.0                  # TiCo-pytorch's --rho default (its help: the paper recommends 8; lightly: 8)
    c.batch_size = 4096                # TiCo follows the BYOL/BT ImageNet protocol
    c.num_epochs = 1000.0
    c.projector.hidden_dims = (4096,)  # TiCo reference implementations: 4096 hidden
    c.projector.out_dim = 256          # TiCo reference implementations: final_dim 256
    c.optimizer.name = "lars"
    c.optimizer.lr = 0.3
    c.optimizer.lr_scaling = "linear"
    c.optimizer.weight_decay = 1.5e-6
    c.optimizer.warmup_epochs = 10.0
    c.checkpoint.every_steps = 2500


RECIPES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar,
           "cifar100": _cifar, "imagenet": _imagenet}
