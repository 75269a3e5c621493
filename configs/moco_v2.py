r"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"; MoCo: He et al. 2019).

COMMAND:
  python experiments/train.py --config=configs/moco_v2.py:digits --workdir=runs/moco_v2_digits
  python experiments/train.py --config=configs/moco_v2.py:imagenet --workdir=runs/moco_v2_r50 \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet (or any registered dataset); append
,encoder=NAME to change the encoder. The momentum encoder and the queue of K keys are method state,
checkpointed and restored on resume; the queue is the same on any device count. config.queue.size must
be a multiple of config.batch_size. cifar10/cifar100 use the base config's values (no tuned recipe).
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("moco_v2", arg, RECIPES, common=_defaults)


def _defaults(c):
    c.loss.temperature = 0.2           # MoCo v2 (Chen et al. 2020, table 1): T = 0.2
    c.momentum.base = 0.999            # MoCo (He et al. 2019, sec. 3.2): m = 0.999 ...
    c.momentum.final = 0.999           # ... constant
    c.queue.size = 65536               # MoCo sec. 4.1: K = 65,536 (ImageNet)


def _cpu(preset, hidden, out_dim):
    def recipe(c):
        presets.apply_cpu_recipe(c, preset)
        c.projector.hidden_dims = hidden
        c.projector.out_dim = out_dim
        # clrjax choice: digits has 1,437 training images, so a longer queue would hold keys of the
        # same images from earlier steps; Fashion-MNIST (60,000) takes 16 batches of 256.
        c.queue.size = 1024 if preset == "digits" else 4096
        c.momentum.base = c.momentum.final = 0.99  # clrjax choice: a few hundred steps
    return recipe


def _imagenet(c):
    c.batch_size = 256                 # MoCo v2 official main_moco.py: batch 256 (8 GPUs)
    c.num_epochs = 800.0               # MoCo v2 table 2: the 800-epoch model (200 in the default command)
    c.projector.hidden_dims = (2048,)  # MoCo v2 sec. 2: MLP head, 2048-d hidden with ReLU ...
    c.projector.use_bn = False         # ... and no BatchNorm (official: Linear-ReLU-Linear)
    c.projector.out_dim = 128          # MoCo: 128-d keys
    c.optimizer.name = "sgd"           # MoCo official: SGD, momentum 0.9
    c.optimizer.lr = 0.03              # MoCo official: lr 0.03 at batch 256
    c.optimizer.weight_decay = 1e-4    # MoCo official: wd 1e-4
    c.optimizer.momentum = 0.9
    c.optimizer.warmup_epochs = 0.0    # MoCo v2: cosine schedule (--cos), no warmup
    c.augment.crop_scale = (0.2, 1.0)  # MoCo v2 official augmentation: RandomResizedCrop(224, scale=(0.2, 1.))
    c.augment.jitter_strength = 0.5    # ColorJitter(0.4, 0.4, 0.4, 0.1) = SimCLR strength 0.5
    c.augment.blur_prob = (0.5, 0.5)   # MoCo v2: Gaussian blur with p = 0.5 on both views
    c.augment.solarize_prob = (0.0, 0.0)  # MoCo v2: no solarisation
    c.checkpoint.every_steps = 5000


RECIPES = {"digits": _cpu("digits", (256,), 64), "fashion_mnist": _cpu("fashion_mnist", (512,), 128),
           "imagenet": _imagenet}
