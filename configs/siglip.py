r"""SigLIP (Zhai et al. 2023): the pairwise sigmoid image-text loss (LiT locking as in configs/clip.py).

COMMAND:
  python experiments/train.py --config=configs/siglip.py:digits --workdir=runs/siglip_digits
  python experiments/train.py --config=configs/siglip.py:fashion_mnist --workdir=runs/siglip_fmnist \
      --config.image_tower.init_from=runs/simclr_fmnist --config.image_tower.locked=True
Presets: digits, fashion_mnist, cifar10, cifar100 (class-name captions), imagenet (the paper's
recipe at batch 32k; point it at image-text pairs as in configs/clip.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip import RECIPES as CLIP_RECIPES, image_text_common  # noqa: E402 - the shared data/tower settings

from clrjax import presets  # noqa: E402


def get_config(arg=None):
    return presets.build_config("siglip", arg, RECIPES, common=image_text_common)


def _imagenet(c):
    CLIP_RECIPES["imagenet"](c)
    # SigLIP (Zhai et al. 2023) sec. 4: batch 32k suffices (the study goes to 1M); sec. 4.7 (stabilising
    # large-batch training): Adam beta2 0.95 instead of 0.999. big_vision configs/proj/image_text/
    # siglip_lit_coco.py: learning rate 1e-3, gradient clipping at global norm 1.0.
    c.batch_size = 32768
    c.model.name = "vit_base"
    c.optimizer.lr = 1e-3
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0
    c.text.context_length = 64         # siglip_b preset: 64 positions (released B/16 models)
    c.text_tower.preset = "siglip_b"   # bidirectional, exact GELU (clrjax/models/text.py)
    c.projector.out_dim = 768          # SigLIP B: the towers' width
    del c.loss["chunk_size"]


RECIPES = dict(CLIP_RECIPES, imagenet=_imagenet)
