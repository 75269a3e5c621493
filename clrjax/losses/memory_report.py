"""Compiled FLOPs and per-device memory of the losses' parallel layouts.

COMMAND: .venv/bin/python -m clrjax.losses.memory_report

Compiles (never runs) loss + gradient under ``jax.shard_map`` on 8 simulated
CPU devices and prints XLA's own accounting from ``.compile().cost_analysis()``
(FLOPs of the per-device SPMD program) and ``.compile().memory_analysis()``
(per-device argument, output and temporary bytes):

1. Barlow Twins, VICReg, TiCo at N=2048, d=8192: impl='replicated' against
   impl='column_split'.
2. SimCLR at N=65,536, d=128: dense against chunk_size=4096.
3. Image-text losses at N=32,768, d=768: SigLIP's ppermute ring against
   impl='all_gather', and CLIP dense against chunk_size=4096 (gradient
   w.r.t. both towers' outputs and the learnable scale and bias).

The gradient is taken w.r.t. the embeddings (the projector's output), which is
what the backward pass of a training step needs. Collapse monitors are off
(monitors=False): their SVD is identical in both layouts.
"""
from __future__ import annotations

import os

# Must precede the first jax import: the device count is fixed at backend start.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from clrjax.losses import (barlow_twins_loss, clip_loss, siglip_loss, simclr_loss,  # noqa: E402
                           tico_loss, vicreg_loss)

N_DEVICES = 8
GIB = 2.0**30


def _compiled_loss_and_grad(loss_fn, n_global, dim, with_cov):
    """Compiles value_and_grad (w.r.t. z_a, z_b) of the shard_map'ed loss."""
    mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))
    rows = P("data")

    def per_shard(z_a, z_b, cov):
        out = loss_fn(z_a, z_b, cov) if with_cov else loss_fn(z_a, z_b)
        return out[0]

    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(rows, rows, P()), out_specs=P())
    step = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1)))
    z = jax.ShapeDtypeStruct((n_global, dim), jnp.float32)
    cov = jax.ShapeDtypeStruct((dim, dim) if with_cov else (1,), jnp.float32)
    return step.lower(z, z, cov).compile()


def _figures(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {
        "gflops": cost.get("flops", float("nan")) / 1e9,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "args_gib": mem.argument_size_in_bytes / GIB,
        "out_gib": mem.output_size_in_bytes / GIB,
    }


def _row(label, fig):
    return (f"{label:<34} {fig['gflops']:>10.2f} {fig['temp_gib']:>10.3f} "
            f"{fig['args_gib']:>9.3f} {fig['out_gib']:>9.3f}")


def report_second_moment_layouts(n_global=2048, dim=8192):
    print(f"\nBT / VICReg / TiCo loss+grad, N={n_global}, d={dim}, {N_DEVICES} devices "
          "(per device)")
    print(f"{'method / impl':<34} {'GFLOPs':>10} {'temp GiB':>10} {'args GiB':>9} {'out GiB':>9}")
    methods = (("barlow_twins", barlow_twins_loss, False), ("vicreg", vicreg_loss, False),
               ("tico", tico_loss, True))
    for name, fn, with_cov in methods:
        for impl in ("replicated", "column_split"):
            def loss_fn(*args, fn=fn, impl=impl):
                return fn(*args, impl=impl, axis_name="data", monitors=False)
            compiled = _compiled_loss_and_grad(loss_fn, n_global, dim, with_cov)
            print(_row(f"{name} / {impl}", _figures(compiled)), flush=True)


def report_simclr_chunking(n_global=65536, dim=128, chunk_size=4096):
    print(f"\nSimCLR loss+grad, N={n_global}, d={dim}, {N_DEVICES} devices (per device)")
    print(f"{'variant':<34} {'GFLOPs':>10} {'temp GiB':>10} {'args GiB':>9} {'out GiB':>9}")
    for chunk in (None, chunk_size):
        def loss_fn(z_a, z_b, chunk=chunk):
            return simclr_loss(z_a, z_b, chunk_size=chunk, axis_name="data", monitors=False)
        compiled = _compiled_loss_and_grad(loss_fn, n_global, dim, with_cov=False)
        label = "dense (unchunked)" if chunk is None else f"chunk_size={chunk}"
        print(_row(label, _figures(compiled)), flush=True)
    print("note: XLA's cost_analysis counts a while-loop (lax.scan) body once, so the chunked\n"
          "GFLOPs undercount; the true FLOPs equal the dense ones (every block is computed).")


def _compiled_image_text_loss_and_grad(loss_fn, n_global, dim):
    """Compiles value_and_grad (w.r.t. img, txt, scale, bias) of the shard_map'ed loss."""
    mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))
    rows = P("data")
    mapped = jax.shard_map(lambda img, txt, scale, bias: loss_fn(img, txt, scale, bias)[0],
                           mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())
    step = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2, 3)))
    z = jax.ShapeDtypeStruct((n_global, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return step.lower(z, z, scalar, scalar).compile()


def report_image_text(n_global=32768, dim=768, chunk_size=4096):
    print(f"\nImage-text loss+grad, N={n_global}, d={dim}, {N_DEVICES} devices (per device)")
    print(f"{'loss / variant':<34} {'GFLOPs':>10} {'temp GiB':>10} {'args GiB':>9} {'out GiB':>9}")
    for impl in ("ppermute", "all_gather"):
        def siglip(img, txt, log_t, bias, impl=impl):
            return siglip_loss(img, txt, log_t, bias, axis_name="data", impl=impl)
        compiled = _compiled_image_text_loss_and_grad(siglip, n_global, dim)
        print(_row(f"siglip / {impl}", _figures(compiled)), flush=True)
    for chunk in (None, chunk_size):
        def clip(img, txt, logit_scale, _unused_bias, chunk=chunk):
            return clip_loss(img, txt, logit_scale, chunk_size=chunk, axis_name="data")
        compiled = _compiled_image_text_loss_and_grad(clip, n_global, dim)
        label = "clip / dense" if chunk is None else f"clip / chunk_size={chunk}"
        print(_row(label, _figures(compiled)), flush=True)
    print("note: the ring's and the chunked GFLOPs undercount too (one scan body counted); their\n"
          "real FLOPs are the dense ones plus the forward that the remat body recomputes.")


def main():
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}")
    report_second_moment_layouts()
    report_simclr_chunking()
    report_image_text()


if __name__ == "__main__":
    main()
