r"""CLIP (Radford et al. 2021) and LiT (Zhai et al. 2022): image-text contrastive learning.

COMMAND:
  python experiments/train.py --config=configs/clip.py:digits --workdir=runs/clip_digits
  python experiments/train.py --config=configs/clip.py:fashion_mnist --workdir=runs/clip_fmnist
  # LiT: lock an image tower pretrained by SimCLR (same config.model), train the text side only
  python experiments/train.py --config=configs/clip.py:fashion_mnist --workdir=runs/lit_fmnist \
      --config.image_tower.init_from=runs/fmnist10_simclr --config.image_tower.locked=True
Presets: digits, fashion_mnist, cifar10, cifar100 (their class names as captions,
clrjax/data/class_captions.py), imagenet (the paper's recipe; point it at image-text pairs with
--config.dataset.name=webdataset --config.dataset.path=... --config.dataset.caption_column=txt).
"""
from clrjax import presets


def get_config(arg=None):
    return presets.build_config("clip", arg, RECIPES, common=image_text_common)


def image_text_common(c):
    """Captioned data, CLIP's augmentation, the tokenizer and towers, shared by CLIP and SigLIP."""
    c.dataset.name = {"imagenet2012": "imagenet2012_captions"}.get(c.dataset.name, f"{c.dataset.name}_captions")
    # CLIP sec. 2.5: "A random square crop from resized images is the only data augmentation".
    a = c.augment
    a.flip_prob, a.jitter_prob, a.gray_prob = 0.0, 0.0, 0.0
    a.blur_prob, a.solarize_prob = (0.0, 0.0), (0.0, 0.0)
    c.text.tokenizer = "bytes"          # offline: UTF-8 bytes (clrjax/data/tokenizers.py)


def _cpu(c, preset):
    presets.apply_cpu_recipe(c, preset)
    c.text.context_length = 64         # the longest template caption is 53 bytes + sot/eot
    c.text_tower.preset = "tiny"       # 2 layers, 64 wide (clrjax/models/text.py)
    c.projector.out_dim = 64           # joint embedding dimension


def _digits(c):
    _cpu(c, "digits")


def _fashion_mnist(c):
    # The shared CPU recipe as is (10 epochs = 2,340 steps of 256): measured on the 2 CPU cores,
    # quiet, 0.21 s/step CLIP, 0.17 SigLIP, 0.11 LiT (locked tower) -> about 8, 7 and 4.5 min of
    # training, so no shorter image-text schedule is needed (the step cost fix of issue 13:
    # clrjax/models/text.py _dense, TwoTower.distinct_texts; it was 2.4x slower).
    _cpu(c, "fashion_mnist")


def _cifar(c):
    c.batch_size = 1024
    c.num_epochs = 100.0
    c.text.context_length = 64
    c.text_tower.preset = "tiny"
    c.projector.out_dim = 256
    c.optimizer.lr = 5e-4               # CLIP table 19-20 (below)
    c.optimizer.weight_decay = 0.2
    c.optimizer.b2 = 0.98
    c.optimizer.warmup_epochs = 5.0


def _imagenet(c):
    # CLIP (Radford et al. 2021) appendix F, table 19 (common) and table 20 (ViT-B/16).
    c.batch_size = 32768                # table 19: batch size 32,768
    c.num_epochs = 32.0                 # table 19: 32 training epochs (of WIT's 400M pairs)
    c.model.name = "vit_base"           # table 20: ViT-B/16
    c.optimizer.name = "adamw"          # sec. 2.5: Adam with decoupled weight decay
    c.optimizer.lr = 5e-4               # table 20: ViT-B/16 learning rate 5e-4
    c.optimizer.weight_decay = 0.2      # table 19: weight decay 0.2 (not on gains or biases, sec. 2.5)
    c.optimizer.b1 = 0.9                # table 19: Adam beta1 0.9
    c.optimizer.b2 = 0.98               # table 19: Adam beta2 0.98 for ViTs
    # table 19: 2,000 warm-up iterations = 2000 x 32,768 / 400M pairs = 0.16 epochs of WIT, then cosine
    c.optimizer.warmup_epochs = 0.16
    c.text.context_length = 77          # official clip/model.py: context_length 77
    c.text_tower.preset = "clip_b"      # sec. 2.4: 12 layers, 512 wide, 8 heads
    c.projector.out_dim = 512           # table 20: ViT-B/16 embedding dimension 512
    c.loss.chunk_size = 4096            # stream the 32,768 columns in blocks (memory, not maths)
    c.checkpoint.every_steps = 2000


RECIPES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
           "imagenet": _imagenet}
