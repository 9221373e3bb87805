"""PyTorch rebuild of the BrainSegFounder SSL loss (reference behaviour).

Written from the definitions in BrainSegFounder `pretrain/losses/loss.py`
(itself from MONAI research-contributions `SwinUNETR/Pretrain`), keeping its
numerics but not its coupling to an argparse namespace:

* `Contrast`: NT-Xent over the 2B x 2B cosine-similarity matrix of the
  concatenated, L2-normalised views; the diagonal is masked out of the
  denominator (which still contains the positive), exp is taken without a
  max-shift, and the sum of -log ratios is divided by 2B. The batch size is
  fixed at construction, as in the reference, and only the samples passed in
  (one GPU's batch under DDP) act as negatives.
* `SSLLoss`: CrossEntropy(rotation) + Contrast + L1(reconstruction), each times
  its alpha (1.0 in the reference), returning `(total, (rot, con, rec))`.

Used by tests/losses_test.py and by the SSL benchmark's PyTorch reference step.
Imports torch at module import time: only import this module where torch is
installed (the `torch` extra).
"""

import torch
import torch.nn.functional as F


class Contrast(torch.nn.Module):
  """NT-Xent loss of the reference (per-process negatives)."""

  def __init__(self, batch_size: int, temperature: float = 0.5):
    """Builds the loss for a fixed per-view batch size.

    Args:
      batch_size: B, the number of samples per view.
      temperature: softmax temperature.
    """
    super().__init__()
    self.batch_size = batch_size
    self.register_buffer("temp", torch.tensor(float(temperature)))
    n = 2 * batch_size
    off_diagonal = ~torch.eye(n, n, dtype=torch.bool)
    self.register_buffer("neg_mask", off_diagonal.float())

  def forward(self, x_i: torch.Tensor, x_j: torch.Tensor) -> torch.Tensor:
    """Returns the scalar NT-Xent loss of views x_i, x_j ([B, E] each)."""
    if x_i.shape[0] != self.batch_size or x_j.shape != x_i.shape:
      raise ValueError(
          f"Contrast built for batch {self.batch_size}; got {tuple(x_i.shape)} "
          f"and {tuple(x_j.shape)}")
    z = torch.cat([F.normalize(x_i, dim=1), F.normalize(x_j, dim=1)], dim=0)
    sim = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=2)
    b = self.batch_size
    positives = torch.cat([torch.diag(sim, b), torch.diag(sim, -b)], dim=0)
    nominator = torch.exp(positives / self.temp)
    denominator = self.neg_mask * torch.exp(sim / self.temp)
    ratio = nominator / torch.sum(denominator, dim=1)
    return torch.sum(-torch.log(ratio)) / (2 * b)


class SSLLoss(torch.nn.Module):
  """Rotation + contrastive + reconstruction loss of the reference."""

  def __init__(self, batch_size: int, alpha_rot: float = 1.0,
               alpha_con: float = 1.0, alpha_rec: float = 1.0,
               temperature: float = 0.5):
    """Builds the loss.

    Args:
      batch_size: B, samples per view (reference: batch_size * sw_batch_size).
      alpha_rot: weight of the rotation cross-entropy.
      alpha_con: weight of the contrastive loss.
      alpha_rec: weight of the L1 reconstruction loss.
      temperature: NT-Xent temperature.
    """
    super().__init__()
    self.rot_loss = torch.nn.CrossEntropyLoss()
    self.recon_loss = torch.nn.L1Loss()
    self.contrast_loss = Contrast(batch_size, temperature)
    self.alphas = (alpha_rot, alpha_con, alpha_rec)

  def forward(self, output_rot, target_rot, output_contrastive,
              target_contrastive, output_recons, target_recons):
    """Returns (total, (rot, con, rec)); the parts are already weighted.

    Argument order and meaning as in the reference `Loss.__call__`: rotation
    logits [2B, 4] and labels [2B], contrastive embeddings of view 1 and view
    2 ([B, E] each), reconstructions and rotated un-augmented targets [2B, ...].
    """
    rot = self.alphas[0] * self.rot_loss(output_rot, target_rot)
    con = self.alphas[1] * self.contrast_loss(output_contrastive,
                                              target_contrastive)
    rec = self.alphas[2] * self.recon_loss(output_recons, target_recons)
    return rot + con + rec, (rot, con, rec)
