"""Float64 references of every registered method, for the shared method-test harness.

Each entry is ``reference(z, labels, state, kwargs, xp) -> (loss, new_state)``:
``z`` [N, V, d] are the projector outputs of the V views of the global batch
(for a method whose loss reads several model outputs, ``method.loss_inputs``,
a dict of them, e.g. BYOL's {'predictions', 'targets'}),
``labels`` [N] its labels, ``state`` the method state before the step, and
``kwargs`` the method's ``config.loss``. They are written from the papers'
definitions on the full batch (``tests/losses/reference.py``) and share no
code with ``clrjax``. A method registered without an entry here fails
``test_every_method_has_a_reference``.
"""
from __future__ import annotations

import numpy as np

from tests.losses import reference, reference_image_text


def _simclr(z, labels, state, kw, xp):
    return reference.simclr(z[:, 0], z[:, 1], kw["temperature"], kw["decoupled"], xp=xp), state


def _barlow_twins(z, labels, state, kw, xp):
    return reference.barlow_twins(z[:, 0], z[:, 1], kw["lambd"], kw["eps"], xp=xp)[0], state


def _vicreg(z, labels, state, kw, xp):
    loss, _ = reference.vicreg(z[:, 0], z[:, 1], kw["sim_coeff"], kw["std_coeff"], kw["cov_coeff"],
                               kw["eps"], xp=xp)
    return loss, state


def _tico(z, labels, state, kw, xp):
    loss, new_cov, _ = reference.tico(z[:, 0], z[:, 1], state["cov"], kw["beta"], kw["rho"], xp=xp,
                                      stop_gradient=_stop_gradient(xp))
    return loss, {"cov": new_cov}


def _supcon(z, labels, state, kw, xp):
    return reference.supcon(z[:, 0], z[:, 1], labels, kw["temperature"], xp=xp), state


def _supervised(z, labels, state, kw, xp):
    """Mean softmax cross-entropy over the 2N views; label smoothing as Szegedy et al. 2016, sec. 7."""
    logits = xp.concatenate([z[:, 0], z[:, 1]])
    targets = np.concatenate([labels, labels])
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    log_p = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    eps, c = kw["label_smoothing"], logits.shape[1]
    soft = (1 - eps) * np.eye(c)[targets] + eps / c
    return -xp.sum(soft * log_p) / logits.shape[0], state


def _byol(z, labels, state, kw, xp):
    """z: {'predictions', 'targets'} [N, 2, d]; the state (target network, momentum) is unchanged by the loss."""
    p, t = z["predictions"], z["targets"]
    return reference.byol(p[:, 0], p[:, 1], t[:, 0], t[:, 1], xp=xp, stop_gradient=_stop_gradient(xp)), state


def _moco_v3(z, labels, state, kw, xp):
    """z: {'predictions' (queries), 'targets' (keys)} [N, 2, d]; state unchanged by the loss."""
    q, k = z["predictions"], z["targets"]
    return reference.moco_v3(q[:, 0], q[:, 1], k[:, 0], k[:, 1], kw["temperature"], xp=xp,
                             stop_gradient=_stop_gradient(xp)), state


def _moco_v2(z, labels, state, kw, xp):
    """z: {'embeddings' (queries: view 0), 'targets' (keys: view 1)}; the keys then enter the queue."""
    q, k = z["embeddings"][:, 0], z["targets"][:, 1]
    stop = _stop_gradient(xp)
    loss = reference.moco_v2(q, k, state["queue"], kw["temperature"], xp=xp, stop_gradient=stop)
    queue, ptr = reference.moco_v2_enqueue(state["queue"], state["queue_ptr"], stop(k), xp=xp)
    return loss, dict(state, queue=queue, queue_ptr=np.float64(ptr))


def _image_text_inputs(z, count):
    """(images [N, d], texts [N, d], scalars): views 0 and 1 of 'embeddings'; the first ``count``
    numbers of row 0 of 'logit_params' are the learnable scalars (clrjax/methods/image_text.py)."""
    scalars = z["logit_params"].reshape(z["logit_params"].shape[0], -1)[0, :count]
    return z["embeddings"][:, 0], z["embeddings"][:, 1], [scalars[i] for i in range(count)]


def _clip(z, labels, state, kw, xp):
    img, txt, (logit_scale,) = _image_text_inputs(z, 1)
    return reference_image_text.clip(img, txt, logit_scale, xp=xp), state


def _siglip(z, labels, state, kw, xp):
    img, txt, (log_t, bias) = _image_text_inputs(z, 2)
    return reference_image_text.siglip(img, txt, log_t, bias, xp=xp), state


def _stop_gradient(xp):
    if xp is np:
        return lambda x: x
    import jax
    return jax.lax.stop_gradient


REFERENCES = {
    "simclr": _simclr,
    "barlow_twins": _barlow_twins,
    "vicreg": _vicreg,
    "tico": _tico,
    "supcon": _supcon,
    "supervised": _supervised,
    "byol": _byol,
    "moco_v3": _moco_v3,
    "moco_v2": _moco_v2,
    "clip": _clip,
    "siglip": _siglip,
}
