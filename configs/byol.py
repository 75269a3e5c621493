r"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): online predictor against an EMA target.

COMMAND:
  python experiments/train.py --config=configs/byol.py:digits --workdir=runs/byol_digits
  python experiments/train.py --config=configs/byol.py:imagenet --workdir=runs/byol_in1k \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet (or any registered dataset); append
,encoder=NAME to change the encoder. The target network (EMA of encoder + projector, parameters and
BatchNorm statistics) is method state: checkpointed and restored on resume; the online encoder is
what is evaluated and exported. cifar10/cifar100 use the base config's values (no tuned recipe).
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("byol", arg, RECIPES, common=_momentum_defaults)


def _momentum_defaults(c):
    c.momentum.base = 0.996            # BYOL sec. 3.2: tau_base = 0.996
    c.momentum.final = 1.0             # BYOL sec. 3.2: tau increased to 1 on a cosine schedule


def _cpu(preset, hidden, out_dim):
    def recipe(c):
        presets.apply_cpu_recipe(c, preset)
        c.projector.hidden_dims = hidden
        c.projector.out_dim = out_dim
        c.predictor.hidden_dims = hidden  # BYOL sec. 3.3: predictor of the projector's architecture
        c.momentum.base = 0.99         # clrjax choice: a few hundred steps; BYOL table 5b: 0.99 works as well
    return recipe


def _imagenet(c):
    c.batch_size = 4096                # BYOL sec. 3.3: batch 4096
    c.num_epochs = 1000.0              # BYOL sec. 3.3: 1000 epochs
    c.projector.hidden_dims = (4096,)  # BYOL sec. 3.3: projector MLP 4096 hidden, BN, ReLU
    c.projector.out_dim = 256          # BYOL sec. 3.3: 256-d projection
    c.projector.use_bn = True
    c.predictor.hidden_dims = (4096,)  # BYOL sec. 3.3: predictor of the same architecture, 4096-256
    c.predictor.use_bn = True
    c.optimizer.name = "lars"          # BYOL sec. 3.3: LARS, biases and BN excluded from decay and adaptation
    c.optimizer.lr = 0.2               # BYOL sec. 3.3: base learning rate 0.2 ...
    c.optimizer.lr_scaling = "linear"  # ... scaled linearly with the batch size (lr = 0.2 x B / 256)
    c.optimizer.base_batch = 256
    c.optimizer.weight_decay = 1.5e-6  # BYOL sec. 3.3: global weight decay 1.5e-6
    c.optimizer.momentum = 0.9         # LARS momentum (BYOL official config, optimizer_config momentum 0.9)
    c.optimizer.trust_coefficient = 0.001  # BYOL official config: eta = 1e-3
    c.optimizer.warmup_epochs = 10.0   # BYOL sec. 3.3: 10 epochs of warmup, then cosine decay
    c.checkpoint.every_steps = 2500


RECIPES = {"digits": _cpu("digits", (256,), 64), "fashion_mnist": _cpu("fashion_mnist", (512,), 128),
           "imagenet": _imagenet}
