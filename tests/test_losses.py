import numpy as np
import pytest
import torch
from monai.losses import FocalLoss

from medfusionnet.data.label_weights import inverse_frequency_weights
from medfusionnet.engine.losses import AsymmetricLoss, ParetoCombinedLoss, create_loss


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(8, 5) * 2, (torch.rand(8, 5) > 0.7).float()


def test_focal_with_gamma_0_and_unit_weights_equals_bce(batch):
    logits, target = batch
    focal = create_loss("focal", focal_gamma=0.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(focal(logits, target), bce)
    assert isinstance(focal, FocalLoss)


def test_focal_weights_and_gamma_by_hand(batch):
    logits, target = batch
    w = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.0])
    loss = create_loss("focal", label_counts=[1, 1, 1, 1, 1], focal_gamma=2.0)(logits, target)
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0, p, 1 - p)
    expected = (-((1 - pt) ** 2) * torch.log(pt)).mean()  # equal counts: unit weights
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    weighted = FocalLoss(gamma=2.0, weight=w, use_softmax=False)(logits, target)
    torch.testing.assert_close(weighted, (-((1 - pt) ** 2) * torch.log(pt) * w).mean(), atol=1e-5, rtol=1e-5)


def test_inverse_frequency_weights_by_hand():
    # 10 images: class a in 5, b in 1, c in none (counted as 1)
    labels = np.zeros((10, 3))
    labels[:5, 0] = 1
    labels[0, 1] = 1
    weights = inverse_frequency_weights(labels.sum(0), power=1.0)
    raw = np.array([10 / 5, 10 / 1, 10 / 1])
    np.testing.assert_allclose(weights.numpy(), raw / raw.mean(), rtol=1e-6)
    sqrt = inverse_frequency_weights(labels.sum(0), power=0.5).numpy()
    np.testing.assert_allclose(sqrt, np.sqrt(raw) / np.sqrt(raw).mean(), rtol=1e-6)
    np.testing.assert_allclose(inverse_frequency_weights([3, 7], power=0.0).numpy(), [1.0, 1.0])
    # counts 1, 100, 100 at power 1: raw weights 1, 0.01, 0.01 over their mean, then clipped to [1/2, 2]
    clipped = inverse_frequency_weights([1, 100, 100], power=1.0, max_gain=2.0).numpy()
    raw = np.array([1.0, 0.01, 0.01]) / np.mean([1.0, 0.01, 0.01])
    np.testing.assert_allclose(clipped, np.clip(raw, 0.5, 2.0), rtol=1e-6)


def test_asymmetric_loss_degenerates_to_bce_and_shifts_negatives(batch):
    logits, target = batch
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(AsymmetricLoss(0.0, 0.0, 0.0)(logits, target), bce)
    # a confident, correct negative (p below the clip margin) costs nothing
    assert AsymmetricLoss(0.0, 4.0, 0.05)(torch.tensor([[-5.0]]), torch.tensor([[0.0]])).item() == 0.0
    p = torch.sigmoid(torch.tensor(1.0))
    by_hand = -((p - 0.05) ** 4) * torch.log(1 - (p - 0.05))
    torch.testing.assert_close(AsymmetricLoss(0.0, 4.0, 0.05)(torch.tensor([[1.0]]), torch.tensor([[0.0]])), by_hand)


def test_pareto_combination_equalises_gradient_norms(batch):
    logits, target = batch
    first = create_loss("focal", focal_gamma=2.0)
    second = AsymmetricLoss(0.0, 4.0, 0.05)
    combined = ParetoCombinedLoss(first, second)
    x = logits.clone().requires_grad_(True)
    combined(x, target).backward()
    x1 = logits.clone().requires_grad_(True)
    (grad1,) = torch.autograd.grad(first(x1, target), x1)
    x2 = logits.clone().requires_grad_(True)
    (grad2,) = torch.autograd.grad(second(x2, target), x2)
    a = combined.alpha_
    assert 0 < a < 1
    assert (a * grad1).norm().item() == pytest.approx(((1 - a) * grad2).norm().item(), rel=1e-5)
    torch.testing.assert_close(x.grad, a * grad1 + (1 - a) * grad2)
    with torch.no_grad():  # evaluation reuses the last weight
        expected = a * first(logits, target) + (1 - a) * second(logits, target)
        torch.testing.assert_close(combined(logits, target), expected)


def test_create_loss_saves_weights_and_rejects_unknown(tmp_path):
    loss = create_loss("focal_asl", label_counts=[5, 1], output_dir=str(tmp_path))
    assert isinstance(loss, ParetoCombinedLoss)
    assert (tmp_path / "class_weights.json").is_file()
    with pytest.raises(ValueError, match="loss='hinge'"):
        create_loss("hinge")
