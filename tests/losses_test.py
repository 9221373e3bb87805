"""Tests for bsf_jax.step.losses against the torch reference and real MONAI."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bsf_jax.step import losses
import ssl_losses

torch = pytest.importorskip("torch")
monai_losses = pytest.importorskip("monai.losses")
ref = pytest.importorskip("bsf_jax.reference.losses")

RTOL = 1e-5
ATOL = 1e-5


def _to_torch_cf(x):
  """Channels-last numpy [B, ..., K] -> channels-first torch [B, K, ...]."""
  return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


# ----------------------------------------------------------------- SSL losses


@pytest.mark.parametrize("b,e", [(1, 8), (4, 512), (8, 32)])
def test_contrastive_matches_reference(b, e):
  rng = np.random.default_rng(b * 100 + e)
  z1 = rng.normal(size=(b, e)).astype(np.float32)
  z2 = rng.normal(size=(b, e)).astype(np.float32)
  got = losses.contrastive_loss(z1, z2)
  want = ref.Contrast(b)(torch.from_numpy(z1), torch.from_numpy(z2)).item()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_contrastive_edge_cases():
  e = 16
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, e)).astype(np.float32)
  # Identical views: positives have cosine 1; must still match the reference.
  got = losses.contrastive_loss(z, z)
  want = ref.Contrast(4)(torch.from_numpy(z), torch.from_numpy(z)).item()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Scale invariance (cosine similarity) and a zero row (normalize eps clamp).
  np.testing.assert_allclose(
      losses.contrastive_loss(3.0 * z, z), got, rtol=RTOL, atol=ATOL)
  z0 = z.copy()
  z0[1] = 0.0
  got0 = losses.contrastive_loss(z0, z)
  want0 = ref.Contrast(4)(torch.from_numpy(z0), torch.from_numpy(z)).item()
  assert np.isfinite(got0)
  np.testing.assert_allclose(got0, want0, rtol=RTOL, atol=ATOL)
  # Other temperature.
  got_t = losses.contrastive_loss(z0, z, temperature=0.1)
  want_t = ref.Contrast(4, 0.1)(torch.from_numpy(z0), torch.from_numpy(z))
  np.testing.assert_allclose(got_t, want_t.item(), rtol=RTOL, atol=ATOL)


def test_contrastive_mask():
  rng = np.random.default_rng(2)
  b, e = 6, 16
  z1 = rng.normal(size=(b, e)).astype(np.float32)
  z2 = rng.normal(size=(b, e)).astype(np.float32)
  t1, t2 = torch.from_numpy(z1), torch.from_numpy(z2)
  # A mask removes samples as anchors and as negatives.
  mask = np.array([True, False, True, True, False, True])
  want_m = ref.Contrast(4)(t1[mask], t2[mask]).item()
  np.testing.assert_allclose(losses.contrastive_loss(z1, z2, mask=mask),
                             want_m, rtol=RTOL, atol=ATOL)
  assert losses.contrastive_loss(z1, z2, mask=np.zeros(b, bool)) == 0.0


def test_ssl_loss_matches_reference_and_bf16():
  rng = np.random.default_rng(1)
  b = 2
  rot_logits = rng.normal(size=(2 * b, 4)).astype(np.float32)
  rot_labels = rng.integers(0, 4, size=(2 * b,))
  z1 = rng.normal(size=(b, 512)).astype(np.float32)
  z2 = rng.normal(size=(b, 512)).astype(np.float32)
  recon = rng.uniform(size=(2 * b, 8, 8, 8, 2)).astype(np.float32)
  target = rng.uniform(size=(2 * b, 8, 8, 8, 2)).astype(np.float32)
  w = dict(w_rot=0.5, w_con=2.0, w_rec=3.0)
  total, parts = jax.jit(lambda *a: ssl_losses.ssl_loss(*a, **w))(
      rot_logits, rot_labels, z1, z2, recon, target)
  rl = ref.SSLLoss(b, 0.5, 2.0, 3.0)
  t_total, (t_rot, t_con, t_rec) = rl(
      torch.from_numpy(rot_logits), torch.from_numpy(rot_labels),
      torch.from_numpy(z1), torch.from_numpy(z2),
      _to_torch_cf(recon), _to_torch_cf(target))
  np.testing.assert_allclose(total, t_total.item(), rtol=RTOL, atol=ATOL)
  # Our parts are unweighted; the reference's are weighted.
  np.testing.assert_allclose(0.5 * parts["rot"], t_rot.item(), rtol=RTOL)
  np.testing.assert_allclose(2.0 * parts["con"], t_con.item(), rtol=RTOL)
  np.testing.assert_allclose(3.0 * parts["rec"], t_rec.item(), rtol=RTOL)
  # bf16 inputs: computed in fp32, so close to the fp32 result of the rounded
  # inputs, and the outputs are fp32.
  args16 = [jnp.asarray(a, jnp.bfloat16) for a in
            (rot_logits, z1, z2, recon, target)]
  total16, parts16 = ssl_losses.ssl_loss(
      args16[0], rot_labels, args16[1], args16[2], args16[3], args16[4], **w)
  assert total16.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in parts16.values())
  up = [np.asarray(a.astype(jnp.float32)) for a in args16]
  total_up, _ = ssl_losses.ssl_loss(up[0], rot_labels, up[1], up[2], up[3],
                                    up[4], **w)
  np.testing.assert_allclose(total16, total_up, rtol=1e-6)


def test_rotation_and_recon_shape_errors():
  with pytest.raises(ValueError, match=r"labels \[N\]"):
    losses.rotation_loss(jnp.zeros((4, 4)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="pred shape"):
    losses.reconstruction_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="equal shape"):
    losses.contrastive_loss(jnp.zeros((2, 3)), jnp.zeros((3, 3)))


# ----------------------------------------------------------------- Dice


def _seg_inputs(seed, b=2, k=3, shape=(6, 5, 4), p_on=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=(b, *shape, k)).astype(np.float32)
  target = (rng.uniform(size=(b, *shape, k)) < p_on).astype(np.float32)
  return logits, target


DICE_CASES = [
    dict(sigmoid=True),
    dict(sigmoid=True, squared_pred=True),
    dict(sigmoid=True, batch=True),
    dict(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-6),  # the BSF BraTS script
    dict(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6),
    dict(softmax=True),
    dict(softmax=True, include_background=False),
    dict(softmax=True, include_background=False, batch=True,
         squared_pred=True),
    dict(),  # probabilities given directly
]


@pytest.mark.parametrize("kw", DICE_CASES)
@pytest.mark.parametrize("target_kind", ["random", "empty", "ones"])
def test_dice_matches_monai(kw, target_kind):
  logits, target = _seg_inputs(len(str(kw)))
  if target_kind == "empty":
    target = np.zeros_like(target)
  elif target_kind == "ones":
    target = np.ones_like(target)
  if not (kw.get("sigmoid") or kw.get("softmax")):
    logits = 1.0 / (1.0 + np.exp(-logits))
  # Eager: the op-by-op cache is shared across the cases (one jit per case
  # would compile 27 programs); test_ssl_loss covers jit.
  got = losses.dice_loss(logits, target, **kw)
  want = monai_losses.DiceLoss(**kw)(_to_torch_cf(logits), _to_torch_cf(target))
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-6)


def test_dice_onehot_and_single_channel():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 5, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 5, 5, 5, 1)).astype(np.float32)
  kw = dict(softmax=True, to_onehot_y=True, include_background=False)
  got = losses.dice_loss(logits, labels, **kw)
  want = monai_losses.DiceLoss(**kw)(_to_torch_cf(logits), _to_torch_cf(labels))
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-6)
  # K == 1: MONAI ignores softmax / include_background=False (with a warning).
  l1 = logits[..., :1]
  t1 = (labels > 1).astype(np.float32)
  kw1 = dict(softmax=True, include_background=False)
  with pytest.warns(UserWarning):
    want1 = monai_losses.DiceLoss(**kw1)(_to_torch_cf(l1), _to_torch_cf(t1))
  np.testing.assert_allclose(losses.dice_loss(l1, t1, **kw1), want1.item(),
                             rtol=1e-5, atol=1e-6)


def test_dice_errors_jit_and_bf16():
  logits, target = _seg_inputs(4)
  kw = dict(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
  np.testing.assert_allclose(
      jax.jit(lambda a, t: losses.dice_loss(a, t, **kw))(logits, target),
      losses.dice_loss(logits, target, **kw), rtol=1e-6)
  with pytest.raises(ValueError, match="target shape"):
    losses.dice_loss(logits, target[..., :2], sigmoid=True)
  with pytest.raises(ValueError, match="mutually exclusive"):
    losses.dice_loss(logits, target, sigmoid=True, softmax=True)
  got16 = losses.dice_loss(jnp.asarray(logits, jnp.bfloat16), target,
                           sigmoid=True)
  assert got16.dtype == jnp.float32
  up = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got16, losses.dice_loss(up, target, sigmoid=True),
                             rtol=1e-6)


@pytest.mark.parametrize("kw,k,label_target", [
    (dict(sigmoid=True), 1, False),  # BCE branch
    (dict(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-6, batch=True), 1, False),
    (dict(sigmoid=True), 3, False),  # MONAI: soft-target softmax CE
    (dict(softmax=True, squared_pred=True), 3, False),
    (dict(softmax=True, to_onehot_y=True), 4, True),  # integer-label CE
    (dict(softmax=True, to_onehot_y=True, lambda_dice=0.3, lambda_ce=2.0), 4,
     True),
])
def test_dice_ce_matches_monai(kw, k, label_target):
  rng = np.random.default_rng(k)
  logits = rng.normal(scale=2.0, size=(2, 6, 5, 4, k)).astype(np.float32)
  if label_target:
    target = rng.integers(0, k, size=(2, 6, 5, 4, 1)).astype(np.float32)
  else:
    target = (rng.uniform(size=logits.shape) < 0.4).astype(np.float32)
  got = losses.dice_ce_loss(logits, target, **kw)
  want = monai_losses.DiceCELoss(**kw)(_to_torch_cf(logits),
                                       _to_torch_cf(target))
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-6)
  # bf16 logits run and return fp32.
  assert losses.dice_ce_loss(jnp.asarray(logits, jnp.bfloat16), target,
                             **kw).dtype == jnp.float32
