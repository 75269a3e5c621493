r"""SupCon (Khosla et al. 2020, "Supervised Contrastive Learning"), L_out (eq. 2).

COMMAND:
  python experiments/train.py --config=configs/supcon.py:digits --workdir=runs/supcon_digits
  python experiments/train.py --config=configs/supcon.py:cifar10 --workdir=runs/supcon_c10 \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet (or any registered dataset); append
,encoder=NAME to change the encoder. SupCon trains on the labels: its positives are every view of
the same class in the global batch.
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("supcon", arg, RECIPES, common=_loss_defaults)


def _loss_defaults(c):
    c.loss.temperature = 0.1           # SupCon paper, temperature ablation: tau = 0.1


def _cpu(preset, hidden, out_dim):
    def recipe(c):
        presets.apply_cpu_recipe(c, preset)
        c.projector.hidden_dims = hidden
        c.projector.out_dim = out_dim
    return recipe


def _cifar(c):
    c.batch_size = 1024                # SupContrast README (official code), CIFAR: --batch_size 1024
    c.num_epochs = 1000.0              # SupContrast main_supcon.py default epochs
    c.projector.hidden_dims = (512,)   # SupContrast 'mlp' head: Linear(F, F) - ReLU - Linear(F, 128); F = 512 (ResNet-18)
    c.projector.use_bn = False         # the official head has no BatchNorm
    c.projector.out_dim = 128          # SupCon sec. 3: 128-d projection
    c.optimizer.name = "sgd"           # SupContrast main_supcon.py: SGD, momentum 0.9
    c.optimizer.lr = 0.5               # SupContrast README, CIFAR: --learning_rate 0.5 (at batch 1024)
    c.optimizer.weight_decay = 1e-4    # SupContrast main_supcon.py default
    c.optimizer.warmup_epochs = 10.0   # SupContrast README uses --warm (10 epochs in main_supcon.py)
    c.checkpoint.every_steps = 2000


def _imagenet(c):
    c.batch_size = 4096                # clrjax choice; the paper trains with batches up to 6144 (sec. 4)
    c.num_epochs = 700.0               # clrjax choice, after the paper's long schedules; not tuned here
    c.projector.hidden_dims = (2048,)  # SupCon sec. 3: projection MLP 2048 -> 128
    c.projector.out_dim = 128
    c.optimizer.name = "lars"          # clrjax choice: SimCLR's large-batch recipe (SimCLR sec. 2.2)
    c.optimizer.lr = 0.3
    c.optimizer.lr_scaling = "linear"  # SimCLR sec. 2.2: lr = 0.3 x B / 256
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_epochs = 10.0
    c.checkpoint.every_steps = 2500


RECIPES = {"digits": _cpu("digits", (256,), 64), "fashion_mnist": _cpu("fashion_mnist", (512,), 128),
           "cifar10": _cifar, "cifar100": _cifar, "imagenet": _imagenet}
