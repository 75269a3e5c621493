"""Bad arguments fail with a sentence naming the argument; the trainer's registry."""
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import losses
from clrjax.losses import (METHOD_NAMES, barlow_twins_loss, get_method, loss_kwarg_names,
                           simclr_loss, tico_loss, vicreg_loss)
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


def test_registry_names_and_errors():
    assert METHOD_NAMES == ("simclr", "barlow_twins", "vicreg", "tico")
    with pytest.raises(ValueError, match="simclr, barlow_twins, vicreg, tico"):
        get_method("byol")
    assert loss_kwarg_names("simclr") == ("temperature", "decoupled", "chunk_size", "monitors")
    assert loss_kwarg_names("tico") == ("beta", "rho", "impl", "monitors")
    assert "lambd" in loss_kwarg_names("barlow_twins")
    assert {"sim_coeff", "std_coeff", "cov_coeff", "eps"} <= set(loss_kwarg_names("vicreg"))
    assert losses.simclr_loss is simclr_loss


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_apply_matches_loss_fn(name):
    z_a, z_b = (jnp.float32(z) for z in embeddings(8, 4))
    method = get_method(name)
    state = method.init_state(4)
    loss, new_state, metrics = method.apply(z_a, z_b, state)
    if method.has_state:
        assert state["cov"].shape == (4, 4) and not np.any(state["cov"])
        direct_loss, direct_cov, _ = tico_loss(z_a, z_b, state["cov"])
        assert_close(new_state["cov"], direct_cov, 0)
    else:
        assert state == {} and new_state == {}
        direct_loss, _ = method.loss_fn(z_a, z_b)
    assert_close(loss, direct_loss, 0)
    assert {"embedding_std", "rankme"} <= set(metrics)
