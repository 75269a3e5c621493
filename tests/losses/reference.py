"""Independent float64 reference definitions of the four losses, from the papers.

Written directly from the definitions on the full global batch (full 2N x 2N
similarity matrix, explicit off-diagonal masks), sharing no code with
``clrjax.losses``. Each takes an array module ``xp`` (numpy by default, or
jax.numpy under ``jax.enable_x64`` to get float64 reference gradients).
"""
from __future__ import annotations

import numpy as np


def _normalize(z, xp):
    return z / xp.sqrt(xp.sum(z * z, axis=1, keepdims=True))


def _logsumexp_rows(x, xp):
    m = xp.max(x, axis=1, keepdims=True)
    return xp.log(xp.sum(xp.exp(x - m), axis=1)) + m[:, 0]


def simclr(z_a, z_b, temperature, decoupled=False, xp=np):
    """NT-Xent (Chen et al. 2020 eq. 1) / DCL (Yeh et al. 2022) on the full batch."""
    n = z_a.shape[0]
    u = _normalize(xp.concatenate([z_a, z_b]), xp)
    logits = u @ u.T / temperature
    idx = np.arange(2 * n)
    positive = np.concatenate([idx[n:], idx[:n]])
    excluded = np.eye(2 * n, dtype=bool)
    if decoupled:
        excluded = excluded | (idx[None, :] == positive[:, None])
    lse = _logsumexp_rows(xp.where(excluded, -np.inf, logits), xp)
    return xp.mean(lse - logits[idx, positive])


def simclr_metrics(z_a, z_b, temperature):
    """Top-1 positive accuracy, alignment (alpha=2), uniformity (t=2, per view, averaged)."""
    n = z_a.shape[0]
    u = _normalize(np.concatenate([z_a, z_b]), np)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.arange(2 * n)
    positive = np.concatenate([idx[n:], idx[:n]])
    accuracy = np.mean(np.argmax(sims, axis=1) == positive)
    u_a, u_b = u[:n], u[n:]
    alignment = np.mean(np.sum((u_a - u_b) ** 2, axis=1))

    def uniformity(v):
        sq_dist = np.sum((v[:, None, :] - v[None, :, :]) ** 2, axis=-1)
        off = ~np.eye(n, dtype=bool)
        return np.log(np.mean(np.exp(-2.0 * sq_dist[off])))

    return {"accuracy": accuracy, "alignment": alignment,
            "uniformity": 0.5 * (uniformity(u_a) + uniformity(u_b))}


def barlow_twins(z_a, z_b, lambd, eps, xp=np):
    """Zbontar et al. 2021: BN-standardised (biased var) cross-correlation loss."""
    def standardize(z):
        mean = xp.mean(z, axis=0)
        var = xp.mean((z - mean) ** 2, axis=0)
        return (z - mean) / xp.sqrt(var + eps)

    n, d = z_a.shape
    c = standardize(z_a).T @ standardize(z_b) / n
    eye = np.eye(d, dtype=bool)
    on = xp.sum((1.0 - xp.diagonal(c)) ** 2)
    off = xp.sum(xp.where(eye, 0.0, c) ** 2)
    return on + lambd * off, {"on_diagonal": on, "off_diagonal": off}


def vicreg(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, xp=np):
    """Bardes et al. 2022, official main_vicreg.py."""
    n, d = z_a.shape
    invariance = xp.mean((z_a - z_b) ** 2)

    def var_and_cov(z):
        x = z - xp.mean(z, axis=0)
        std = xp.sqrt(xp.sum(x ** 2, axis=0) / (n - 1) + eps)
        cov = x.T @ x / (n - 1)
        off = xp.where(np.eye(d, dtype=bool), 0.0, cov)
        return xp.mean(xp.maximum(1.0 - std, 0.0)), xp.sum(off ** 2) / d

    var_a, cov_a = var_and_cov(z_a)
    var_b, cov_b = var_and_cov(z_b)
    variance = var_a / 2 + var_b / 2
    covariance = cov_a + cov_b
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}


def tico(z_a, z_b, cov, beta, rho, xp=np, stop_gradient=lambda x: x):
    """Zhu et al. 2022: returns (loss, new_cov, metrics); new_cov is a constant."""
    n = z_a.shape[0]
    u_a, u_b = _normalize(z_a, xp), _normalize(z_b, xp)
    new_cov = stop_gradient(beta * cov + (1 - beta) * (u_a.T @ u_a) / n)
    invariance = 1.0 - xp.mean(xp.sum(u_a * u_b, axis=1))
    covariance = xp.mean(xp.sum((u_a @ new_cov) * u_a, axis=1))
    return invariance + rho * covariance, new_cov, {"invariance": invariance,
                                                    "covariance": covariance}


def collapse_monitors(z):
    """embedding_std (ddof=0, L2-normalised rows) and RankMe (Garrido et al. 2023, eps=1e-7)."""
    u = _normalize(z, np)
    sigma = np.linalg.svd(z, compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    return {"embedding_std": np.mean(np.std(u, axis=0)), "rankme": np.exp(-np.sum(p * np.log(p)))}


def supcon(z_a, z_b, labels, temperature, xp=np):
    """Khosla et al. 2020 eq. 2 (L_out) on the full batch, averaged over the 2N anchors.

    Anchors are both views of every image; A(i) is every other view, P(i) the
    views in A(i) with anchor i's label. ``labels`` is a NumPy integer array.
    """
    n = z_a.shape[0]
    u = _normalize(xp.concatenate([z_a, z_b]), xp)
    logits = u @ u.T / temperature
    y = np.concatenate([np.asarray(labels), np.asarray(labels)])
    is_self = np.eye(2 * n, dtype=bool)
    is_positive = (y[:, None] == y[None, :]) & ~is_self
    log_prob = logits - _logsumexp_rows(xp.where(is_self, -np.inf, logits), xp)[:, None]
    per_anchor = -xp.sum(xp.where(is_positive, log_prob, 0.0), axis=1) / is_positive.sum(axis=1)
    return xp.mean(per_anchor)


def byol(p_a, p_b, t_a, t_b, xp=np, stop_gradient=lambda x: x):
    """Grill et al. 2020 eq. 2, symmetrised: mean_i ||u(p_a,i) - u(t_b,i)||^2 + ||u(p_b,i) - u(t_a,i)||^2, u(x) = x / ||x||.

    Written as the normalised squared error rather than 2 - 2 cos; the target
    projections t are constants (``stop_gradient``).
    """
    t_a, t_b = stop_gradient(t_a), stop_gradient(t_b)
    err_ab = _normalize(p_a, xp) - _normalize(t_b, xp)
    err_ba = _normalize(p_b, xp) - _normalize(t_a, xp)
    return xp.mean(xp.sum(err_ab * err_ab, axis=1) + xp.sum(err_ba * err_ba, axis=1))


def target_momentum(k, total_steps, base, final=1.0):
    """tau_k = final - (final - base) (cos(pi k / K) + 1) / 2 (BYOL sec. 3.2 with final = 1), float64."""
    return final - (final - base) * (np.cos(np.pi * k / total_steps) + 1.0) / 2.0


def moco_v3(q_a, q_b, k_a, k_b, temperature, xp=np, stop_gradient=lambda x: x):
    """Chen, Xie & He 2021, Algorithm 1: ctr(q_a, k_b) + ctr(q_b, k_a) on the full batch, ctr scaled by 2T.

    ctr(q, k) = 2T * mean_i [ -log softmax_j(u(q_i) . u(k_j) / T)_i ], keys constants.
    """
    def ctr(q, k):
        logits = _normalize(q, xp) @ _normalize(stop_gradient(k), xp).T / temperature
        idx = np.arange(q.shape[0])
        return 2 * temperature * xp.mean(_logsumexp_rows(logits, xp) - logits[idx, idx])
    return ctr(q_a, k_b) + ctr(q_b, k_a)


def moco_v2(q, k, queue, temperature, xp=np, stop_gradient=lambda x: x):
    """He et al. 2019 eq. 1: mean_i -log softmax([u(q_i).u(k_i), u(q_i).Q^T] / T)_0 on the full batch."""
    u_q, u_k = _normalize(q, xp), _normalize(stop_gradient(k), xp)
    logits = xp.concatenate([xp.sum(u_q * u_k, axis=1, keepdims=True), u_q @ stop_gradient(queue).T],
                            axis=1) / temperature
    return xp.mean(_logsumexp_rows(logits, xp) - logits[:, 0])


def moco_v2_enqueue(queue, ptr, k, xp=np):
    """The queue after a step: rows ptr .. ptr + N replaced by the unit keys in example order; ptr += N mod K."""
    ptr, n = int(ptr), k.shape[0]
    keys = _normalize(k, xp)
    return xp.concatenate([queue[:ptr], keys, queue[ptr + n:]]), (ptr + n) % queue.shape[0]
