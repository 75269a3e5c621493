r"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

COMMAND:
  python experiments/train.py --config=configs/moco_v3.py:digits --workdir=runs/moco_v3_digits
  python experiments/train.py --config=configs/moco_v3.py:imagenet --workdir=runs/moco_v3_r50 \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
  python experiments/train.py --config=configs/moco_v3.py:imagenet,encoder=vit_small --workdir=runs/moco_v3_vits
Presets: digits, fashion_mnist, cifar10, cifar100, imagenet (or any registered dataset); append
,encoder=NAME to change the encoder (imagenet with a ViT encoder gets the paper's ViT recipe).
The momentum encoder (EMA of encoder + projector) is method state, checkpointed and restored on
resume; the online encoder is what is evaluated and exported. cifar10/cifar100 use the base
config's values (no tuned recipe). With a ViT encoder (any preset) the patch embedding is frozen
at its random initialisation (config.optimizer.freeze; paper sec. 4.2, official --stop-grad-conv1).
"""
from clrjax import presets


def get_config(arg=None):
    c = presets.build_config("moco_v3", arg, RECIPES, common=_defaults)
    if presets.parse_config_arg(arg)[0] == "imagenet" and c.model.name.startswith("vit"):
        _imagenet_vit(c)
    if c.model.name.startswith("vit"):
        # Sec. 4.2 "random patch projection": the patch projection stays at its random init, for
        # stability; official vits.py (stop_grad_conv1) freezes proj.weight and proj.bias, and the
        # three ViT pre-training commands of CONFIG.md pass --stop-grad-conv1.
        c.optimizer.freeze = ("encoder/patch_embed",)
    return c


def _defaults(c):
    c.loss.temperature = 0.2           # MoCo v3 sec. 4 / CONFIG.md ViT runs: --moco-t=.2
    c.momentum.base = 0.99             # official main_moco.py --moco-m default 0.99 ...
    c.momentum.final = 1.0             # ... increased to 1 with a half-cycle cosine (--moco-m-cos)


def _cpu(preset, hidden, out_dim):
    def recipe(c):
        presets.apply_cpu_recipe(c, preset)
        c.projector.hidden_dims = hidden
        c.projector.out_dim = out_dim
        c.predictor.hidden_dims = hidden  # official builder: 2-layer predictor, mlp_dim hidden
    return recipe


def _imagenet(c):
    """ResNet-50, 300 epochs (official CONFIG.md: --lr=.3 --epochs=300 --moco-m-cos --crop-min=.2)."""
    c.batch_size = 4096                # official main_moco.py default batch 4096
    c.num_epochs = 300.0               # CONFIG.md ResNet-50 300-epoch
    c.loss.temperature = 1.0           # official main_moco.py --moco-t default 1.0 (the ResNet runs)
    c.augment.crop_scale = (0.2, 1.0)  # CONFIG.md --crop-min=.2
    c.projector.hidden_dims = (4096,)  # official builder, ResNet: 2-layer projector, mlp_dim 4096 ...
    c.projector.out_dim = 256          # ... to dim 256 ...
    c.projector.last_bn = True         # ... ending in an affine-free BatchNorm
    c.predictor.hidden_dims = (4096,)  # official builder: 2-layer predictor 256-4096-256, no last BN
    c.optimizer.name = "lars"          # official main_moco.py --optimizer default lars
    c.optimizer.lr = 0.3               # CONFIG.md 300-epoch: --lr=.3 ...
    c.optimizer.lr_scaling = "linear"  # ... scaled as lr x B / 256 (main_moco.py init_lr)
    c.optimizer.base_batch = 256
    c.optimizer.weight_decay = 1e-6    # official main_moco.py --wd default 1e-6
    c.optimizer.momentum = 0.9         # official main_moco.py --momentum default 0.9
    c.optimizer.warmup_epochs = 10.0   # official main_moco.py --warmup-epochs default 10
    c.checkpoint.every_steps = 2500


def _imagenet_vit(c):
    """ViT-S/B, 300 epochs (CONFIG.md: --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --warmup-epochs=40)."""
    c.loss.temperature = 0.2           # CONFIG.md ViT: --moco-t=.2
    c.projector.hidden_dims = (4096, 4096)  # official builder, ViT: 3-layer projector 4096-4096-256
    c.optimizer.name = "adamw"         # CONFIG.md ViT: --optimizer=adamw
    c.optimizer.lr = 1.5e-4            # CONFIG.md ViT: --lr=1.5e-4, x B / 256
    c.optimizer.lr_scaling = "linear"
    c.optimizer.weight_decay = 0.1     # CONFIG.md ViT: --weight-decay=.1
    c.optimizer.warmup_epochs = 40.0   # CONFIG.md ViT: --warmup-epochs=40


RECIPES = {"digits": _cpu("digits", (256,), 64), "fashion_mnist": _cpu("fashion_mnist", (512,), 128),
           "imagenet": _imagenet}
