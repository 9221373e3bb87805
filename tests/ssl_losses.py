"""The SSL objective as one function, for tests (reference `Loss` of
BrainSegFounder `pretrain/losses/loss.py`, alpha1..3 = the weights).

The SSL step (`bsf_jax.step.ssl_step.make_loss_fn`) computes the same three
terms of `bsf_jax.step.losses` on each device's rows; tests compare it and the
torch rebuild (`bsf_jax.reference.losses.SSLLoss`) against this.
"""

from typing import Mapping

import jax

from bsf_jax.step import losses

Array = jax.Array


def ssl_loss(
    rot_logits: Array,
    rot_labels: Array,
    z1: Array,
    z2: Array,
    recon: Array,
    recon_target: Array,
    *,
    w_rot: float = 1.0,
    w_con: float = 1.0,
    w_rec: float = 1.0,
    temperature: float = 0.5,
) -> tuple[Array, Mapping[str, Array]]:
  """The weighted sum of the three SSL losses.

  Concatenation order follows `bsf_jax.step.ssl_views.make_views`: the first B
  rows of `rot_logits`, `rot_labels`, `recon`, `recon_target` belong to view
  1, the next B rows to view 2.

  Args:
    rot_logits: [2B, 4] rotation logits of both views.
    rot_labels: [2B] rotation classes (from `make_views`).
    z1: [B, E] contrastive embeddings of view 1.
    z2: [B, E] contrastive embeddings of view 2.
    recon: [2B, H, W, D, C] reconstructions of both augmented views.
    recon_target: [2B, H, W, D, C] rotated, un-augmented volumes.
    w_rot: weight of the rotation loss.
    w_con: weight of the contrastive loss.
    w_rec: weight of the reconstruction loss.
    temperature: NT-Xent temperature.

  Returns:
    (total, parts): total = w_rot*rot + w_con*con + w_rec*rec, and parts the
    *unweighted* terms {"rot", "con", "rec"} (float32 scalars).
  """
  if rot_logits.shape[0] != 2 * z1.shape[0]:
    raise ValueError(
        f"ssl_loss: rot_logits has {rot_logits.shape[0]} rows but z1 has "
        f"{z1.shape[0]}; expected 2B rows (view 1 then view 2)")
  parts = {
      "rot": losses.rotation_loss(rot_logits, rot_labels),
      "con": losses.contrastive_loss(z1, z2, temperature),
      "rec": losses.reconstruction_loss(recon, recon_target),
  }
  total = w_rot * parts["rot"] + w_con * parts["con"] + w_rec * parts["rec"]
  return total, parts
