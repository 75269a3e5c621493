r"""VICReg (Bardes, Ponce & LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization").

COMMAND:
  python experiments/train.py --config=configs/vicreg.py:digits --workdir=runs/vicreg_digits
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet; append ,encoder=NAME to change the encoder.
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("vicreg", arg, RECIPES, common=_loss_defaults)


def _loss_defaults(c):
    c.loss.sim_coeff = 25.0            # VICReg sec. 4.1: lambda = 25
    c.loss.std_coeff = 25.0            # official main_vicreg.py std_coeff=25 (its /2 per view: the paper's mu = 12.5)
    c.loss.cov_coeff = 1.0             # VICReg sec. 4.1: nu = 1


def _digits(c):
    presets.apply_cpu_recipe(c, "digits")
    c.projector.hidden_dims = (512,)   # VICReg's expander, scaled to the 8x8 task
    c.projector.out_dim = 256          # embedding dimension d


def _fashion_mnist(c):
    presets.apply_cpu_recipe(c, "fashion_mnist")
    c.projector.hidden_dims = (512,)
    c.projector.out_dim = 256


def _cifar(c):
    c.batch_size = 256                 # solo-learn CIFAR recipe
    c.num_epochs = 1000.0              # solo-learn CIFAR recipe
    c.projector.hidden_dims = (2048, 2048)  # solo-learn CIFAR: 3-layer 2048-wide expander
    c.projector.out_dim = 2048
    c.optimizer.name = "lars"
    c.optimizer.lr = 0.3               # solo-learn CIFAR recipe
    c.optimizer.lr_scaling = "linear"
    c.optimizer.weight_decay = 1e-4    # solo-learn CIFAR recipe
    c.optimizer.warmup_epochs = 10.0
    c.checkpoint.every_steps = 2000


def _imagenet(c):
    c.batch_size = 2048                # VICReg sec. 4.1: batch 2048
    c.num_epochs = 1000.0              # VICReg sec. 4.1: 1000 epochs
    c.projector.hidden_dims = (8192, 8192)  # VICReg sec. 4.1: expander 8192-8192-8192
    c.projector.out_dim = 8192
    c.optimizer.name = "lars"          # VICReg sec. 4.1: LARS
    c.optimizer.lr = 0.2               # VICReg official code: base_lr 0.2
    c.optimizer.lr_scaling = "linear"  # VICReg official code: lr = base_lr * batch_size / 256
    c.optimizer.weight_decay = 1e-6    # VICReg sec. 4.1
    c.optimizer.warmup_epochs = 10.0   # VICReg sec. 4.1
    c.checkpoint.every_steps = 2500


RECIPES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar,
           "cifar100": _cifar, "imagenet": _imagenet}
