r"""SimCLR on digits: NT-Xent temperature x AdamW learning rate (9 runs).

COMMAND:
  python launch/sweep.py run launch/sweeps/simclr_digits_temp_lr.py \
      --config=configs/simclr.py:digits --workdir=runs/sweep_temp_lr --parallel=2
  python launch/sweep.py collect runs/sweep_temp_lr --metric=pretrained.linear_top1 --mode=max
Temperatures bracket the digits preset's 0.2 (configs/simclr.py:digits; 60 s of
CPU training with it gave ~0.99 linear top-1); learning rates bracket its 2e-3
by a factor of 2 each way.
"""
from launch import hyper


def get_sweep():
    return hyper.product(
        hyper.sweep("loss.temperature", [0.1, 0.2, 0.5]),
        hyper.sweep("optimizer.lr", [1e-3, 2e-3, 4e-3]),
    )
