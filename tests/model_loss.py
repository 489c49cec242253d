"""Next-token loss, logits and gradients of a model: the quantities the sharding and multi-host
tests compare between meshes, hosts and a single device."""

import functools

import jax
import jax.numpy as jnp

import llama_jax as lj


@functools.partial(jax.jit, static_argnums=2)
def loss_logits_grads(params, tokens, cfg):
    def loss_fn(p):
        logits = lj.Llama(cfg).apply({"params": p}, tokens[:, :-1])
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(logz - picked), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads
