import jax
import jax.numpy as jnp
from metadiff_jax import diffusion, prototypes, schedule, tcunet, pytorch_weights

B, N, K, Q, D = 8, 5, 1, 15, 512  # episodes, ways, shots, queries per class, feature dim
k_centres, k_support, k_query, k_init, k_w, k_loss = jax.random.split(jax.random.key(0), 6)
centres = jax.random.normal(k_centres, (B, N, D))  # stand-ins for frozen backbone features
labels = jnp.tile(jnp.arange(N), (B, K))  # [B, N*K] ints in [0, N)
query_labels = jnp.tile(jnp.arange(N), (B, Q))  # [B, N*Q]
pick = jax.vmap(lambda c, y: c[y])
support = pick(centres, labels) + 4.0 * jax.random.normal(k_support, (B, N * K, D))
query = pick(centres, query_labels) + 4.0 * jax.random.normal(k_query, (B, N * Q, D))

sched = schedule.linear(num_steps=1000, beta_start=1e-4, beta_end=0.02)
model = tcunet.TCUNet(feature_dim=D)
variables = model.init(k_init, jnp.zeros((N, D)), 0, support[0], labels[0])
# or: variables = {"params": pytorch_weights.tcunet_params_from_torch(state_dict)}
w_Ts = jax.random.normal(k_w, (B, N, D))  # Algorithm 2: w_T ~ N(0, I)
eps = model.apply(variables, w_Ts[0], 999, support[0], labels[0])  # [N, D]
w0 = diffusion.sample(model, variables, sched, w_Ts[0], support[0], labels[0])  # [N, D]
w0s = diffusion.sample_batch(model, variables, sched, w_Ts, support, labels)  # [B, N, D]
targets = jax.vmap(prototypes.class_means, (0, 0, None))(support, labels, N)  # [B, N, D]
loss = diffusion.loss(model, variables, sched, targets, support, labels, k_loss)  # Eq. 12
logits = prototypes.cosine_logits(query, w0s, scale=10.0)  # [B, N*Q, N]

accuracy = jnp.mean(jnp.argmax(logits, -1) == query_labels)
print(f"diffusion loss {float(loss):.3f}; query accuracy of the untrained denoiser's "
      f"prototypes over {B} episodes: {float(accuracy):.3f}")
