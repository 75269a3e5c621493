r"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

COMMAND:
  python experiments/train.py --config=configs/simclr.py:digits --workdir=runs/simclr_digits
  python experiments/train.py --config=configs/simclr.py:cifar10 --workdir=runs/simclr_c10 \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet; append ,encoder=NAME to change the encoder.
Any field can be overridden with --config.<field>=<value> (e.g. --config.loss.temperature=0.2).
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("simclr", arg, RECIPES)


def _digits(c):
    presets.apply_cpu_recipe(c, "digits")
    c.loss.temperature = 0.2           # measured: tau=0.2 gave 0.99 linear on digits in 60 s (2 CPU cores)
    c.loss.decoupled = False           # plain NT-Xent (True: DCL, Yeh et al. 2022)
    c.projector.hidden_dims = (256,)   # SimCLR v1: one hidden layer
    c.projector.out_dim = 64           # small embedding for 1,438 training images


def _fashion_mnist(c):
    presets.apply_cpu_recipe(c, "fashion_mnist")
    c.loss.temperature = 0.2           # as on digits (measured on Fashion-MNIST: 0.86 linear in 10 min)
    c.loss.decoupled = False
    c.projector.hidden_dims = (512,)   # SimCLR v1: one hidden layer
    c.projector.out_dim = 128          # SimCLR sec. 2.1: 128-d embedding


def _cifar(c):
    c.loss.temperature = 0.5           # SimCLR README CIFAR-10 example (and app. B.9): tau = 0.5
    c.loss.decoupled = False
    c.batch_size = 512                 # SimCLR README CIFAR-10 example: train_batch_size=512
    c.num_epochs = 1000.0              # SimCLR README CIFAR-10 example: train_epochs=1000
    c.projector.hidden_dims = (2048,)  # SimCLR v1: 2-layer MLP head, hidden width = ResNet feature width
    c.projector.out_dim = 128          # SimCLR sec. 2.1: 128-d output
    c.optimizer.name = "lars"          # SimCLR sec. 2.2: LARS for all batch sizes
    c.optimizer.lr = 1.0               # SimCLR README CIFAR-10 example: learning_rate=1.0
    c.optimizer.lr_scaling = "linear"  # SimCLR code default: lr * batch / 256
    c.optimizer.weight_decay = 1e-4    # SimCLR README CIFAR-10 example: weight_decay=1e-4
    c.optimizer.warmup_epochs = 10.0   # SimCLR sec. 2.2: 10 warmup epochs, then cosine
    c.checkpoint.every_steps = 2000


def _imagenet(c):
    c.loss.temperature = 0.1           # SimCLR table 5 / app. B.1: tau = 0.1 at batch 4096
    c.loss.decoupled = False
    c.batch_size = 4096                # SimCLR sec. 2.2: default batch 4096
    c.num_epochs = 100.0               # SimCLR sec. 2.2: 100 epochs (up to 800 in sec. 6)
    c.projector.hidden_dims = (2048,)  # SimCLR v1: 2048-2048-128 head
    c.projector.out_dim = 128          # SimCLR sec. 2.1
    c.optimizer.name = "lars"          # SimCLR sec. 2.2
    c.optimizer.lr = 0.3               # SimCLR sec. 2.2: LR = 0.3 x BatchSize/256 (4.8 at 4096)
    c.optimizer.lr_scaling = "linear"  # SimCLR sec. 2.2 (app. B.1: sqrt rule 0.075 x sqrt(B) for small B)
    c.optimizer.weight_decay = 1e-6    # SimCLR sec. 2.2
    c.optimizer.warmup_epochs = 10.0   # SimCLR sec. 2.2
    c.probe.lr = 1e-3
    c.checkpoint.every_steps = 2500


RECIPES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar,
           "cifar100": _cifar, "imagenet": _imagenet}
