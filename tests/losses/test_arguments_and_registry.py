"""Bad arguments fail with a sentence naming the argument; the trainer's registry."""
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib
from clrjax import losses, methods
from clrjax.losses import barlow_twins_loss, simclr_loss, tico_loss, vicreg_loss
from clrjax.losses._validation import resolve_impl
from tests.losses.cases import assert_close, embeddings

Z = jnp.ones((4, 3))


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_nonpositive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        simclr_loss(Z, Z, temperature=temperature)


@pytest.mark.parametrize("fn", [simclr_loss, barlow_twins_loss, vicreg_loss])
def test_shape_mismatch(fn):
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        fn(Z, jnp.ones((4, 5)))


def test_non_matrix_embeddings():
    with pytest.raises(ValueError, match="2-D"):
        vicreg_loss(jnp.ones((4, 3, 1)), jnp.ones((4, 3, 1)))


def test_wrong_cov_shape():
    with pytest.raises(ValueError, match=r"cov must have shape \(3, 3\)"):
        tico_loss(Z, Z, jnp.zeros((4, 4)))


def test_bad_beta_and_impl():
    with pytest.raises(ValueError, match="beta"):
        tico_loss(Z, Z, jnp.zeros((3, 3)), beta=1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        barlow_twins_loss(Z, Z, impl="fast")


def test_auto_impl_choice():
    assert resolve_impl("auto", 8192, 8, "data") == "column_split"
    assert resolve_impl("auto", 8192, 8, None) == "replicated"
    assert resolve_impl("auto", 512, 8, "data") == "replicated"
    assert resolve_impl("auto", 1030, 8, "data") == "replicated"
    with pytest.raises(ValueError, match="divisible"):
        resolve_impl("column_split", 1030, 8, "data")


def _kwarg_names(name):
    return tuple(methods.get(name).loss_kwarg_defaults())


def test_registry_names_and_errors():
    assert methods.names() == ("simclr", "barlow_twins", "vicreg", "tico", "supcon", "supervised", "byol",
                               "moco_v3", "moco_v2", "clip", "siglip")
    with pytest.raises(ValueError, match="simclr, barlow_twins, vicreg, tico"):
        methods.get("swav")
    assert _kwarg_names("simclr") == ("temperature", "decoupled", "chunk_size", "monitors")
    assert _kwarg_names("tico") == ("beta", "rho", "impl", "monitors")
    assert "lambd" in _kwarg_names("barlow_twins")
    assert {"sim_coeff", "std_coeff", "cov_coeff", "eps"} <= set(_kwarg_names("vicreg"))
    assert _kwarg_names("supcon") == ("temperature", "chunk_size", "monitors")
    assert losses.simclr_loss is simclr_loss


def _state_config(dim):
    config = config_lib.base_config()
    config.projector.out_dim = dim
    return config


@pytest.mark.parametrize("name", ["simclr", "barlow_twins", "vicreg", "tico"])
def test_method_loss_matches_loss_fn(name):
    z_a, z_b = (jnp.float32(z) for z in embeddings(8, 4))
    method = methods.get(name)
    state = method.init_state(_state_config(4), {})
    outputs = {"embeddings": jnp.stack([z_a, z_b], axis=1)}
    batch = {"label": jnp.zeros(8, jnp.int32), "index": jnp.arange(8)}
    loss, new_state, metrics = method.loss(outputs, batch, state)
    if name == "tico":
        assert state["cov"].shape == (4, 4) and not np.any(state["cov"])
        direct_loss, direct_cov, _ = tico_loss(z_a, z_b, state["cov"])
        assert_close(new_state["cov"], direct_cov, 0)
    else:
        assert state == {} and new_state == {}
        direct_loss, _ = method.loss_fn(z_a, z_b)
    assert_close(loss, direct_loss, 0)
    assert {"embedding_std", "rankme"} <= set(metrics)
