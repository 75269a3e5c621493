r"""PyTorch reference of the clrjax SimCLR train step, for the GPU throughput comparison.

COMMAND (one H100; see benchmarks/run_gpu_benchmarks.sh):
  python benchmarks/torch_reference.py --arch=resnet50 --image_size=224 --batch_size=256
  # CPU smoke test without torchvision:
  python benchmarks/torch_reference.py --arch=tiny --image_size=32 --batch_size=8 --steps=2 --no_compile

What one timed step does (the same work as clrjax's SimCLR step, minus what is noted):
  * encoder: torchvision ``resnet50`` (fc removed, 2048-d features), or ``--arch=tiny``,
    a 2-layer CNN for machines without torchvision;
  * projector: Linear(F, 2048, no bias) - BatchNorm - ReLU - Linear(2048, 128), as
    clrjax's ``Projector(hidden_dims=(2048,), out_dim=128, use_bn=True)``;
  * the encoder and projector run on both views of B images as ONE batch of 2B, so
    BatchNorm statistics cover both views (as in clrjax);
  * NT-Xent (SimCLR eq. 1) over 2B anchors, temperature 0.1, computed in float32;
  * an online linear probe (Linear(F, 10), cross-entropy on detached features), as
    clrjax trains one in every step (``--no_probe`` leaves it out);
  * plain SGD with momentum 0.9 on everything (no LARS: LARS adds a per-layer trust
    ratio, a few elementwise passes over the parameters; compare with clrjax run with
    ``--config.optimizer.name=sgd``);
  * bf16 autocast (``--dtype=float32`` to turn off), channels_last memory format,
    ``torch.compile`` of model + loss (``--no_compile`` to turn off).
Left out on purpose: data augmentation. The views are synthetic tensors already on the
device, whereas clrjax's step also runs its random-resized-crop/colour/blur augmentation
on the device, so the comparison is conservative for clrjax.

Prints one JSON line: median step time, images/s (B images = 2B views per step), settings
and versions; ``--json_out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "tiny"])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=256, help="images per step (2x views)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--proj_hidden", type=int, default=2048)
    p.add_argument("--proj_out", type=int, default=128)
    p.add_argument("--num_classes", type=int, default=10, help="online probe classes (clrjax synthetic: 10)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype")
    p.add_argument("--no_channels_last", action="store_true")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--no_probe", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--json_out", default="")
    return p.parse_args(argv)


def build_encoder(arch: str):
    """(module, feature width). torchvision is imported only for resnet50."""
    import torch.nn as nn
    if arch == "resnet50":
        try:
            import torchvision
        except ImportError as err:
            raise SystemExit("--arch=resnet50 needs torchvision (pip install torchvision); "
                             "use --arch=tiny for a smoke test without it") from err
        net = torchvision.models.resnet50(weights=None)
        width = net.fc.in_features
        net.fc = nn.Identity()
        return net, width
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 32


def nt_xent(z, temperature: float):
    """SimCLR NT-Xent over 2B anchors; rows 2i and 2i+1 of ``z`` are the two views of image i."""
    import torch
    import torch.nn.functional as F
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.t() / temperature
    n2 = z.shape[0]
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.arange(n2, device=z.device) ^ 1  # 2i <-> 2i+1
    return F.cross_entropy(logits, positives)


def make_model(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    encoder, width = build_encoder(args.arch)

    class SimCLRStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.projector = nn.Sequential(
                nn.Linear(width, args.proj_hidden, bias=False), nn.BatchNorm1d(args.proj_hidden),
                nn.ReLU(inplace=True), nn.Linear(args.proj_hidden, args.proj_out))
            self.probe = None if args.no_probe else nn.Linear(width, args.num_classes)

        def forward(self, views, labels):
            h = self.encoder(views)
            loss = nt_xent(self.projector(h), args.temperature)
            if self.probe is not None:
                logits = self.probe(h.detach().float())
                loss = loss + F.cross_entropy(logits, labels.repeat_interleave(2))
            return loss

    return SimCLRStep()


def run(args) -> dict:
    import torch
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = make_model(args).to(device)
    memory_format = torch.preserve_format if args.no_channels_last else torch.channels_last
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    b, s = args.batch_size, args.image_size
    views = torch.randn(2 * b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.num_classes, (b,), device=device)
    forward = model if args.no_compile else torch.compile(model, mode=args.compile_mode)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = forward(views, labels)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "framework": "torch", "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "arch": args.arch, "image_size": s, "batch_size": b, "views_per_step": 2 * b,
        "dtype": args.dtype, "channels_last": not args.no_channels_last, "compile": not args.no_compile,
        "compile_mode": args.compile_mode, "probe": not args.no_probe, "optimizer": "sgd(momentum=0.9)",
        "steps": args.steps, "warmup": args.warmup, "warmup_s": warmup_s,
        "median_step_s": median, "min_step_s": min(times), "images_per_s": b / median,
        "final_loss": float(loss.detach()),
        "peak_device_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
    }


def main(argv=None):
    args = _parse(argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
