"""The paper's comparison networks through timm (optional: ``pip install "medfusionnet[baselines]"``; CI runs these
tests in a virtual environment that has it)."""

import os

import pytest
import torch

import medfusionnet
from medfusionnet.networks.baselines import TimmTabular
from medfusionnet.networks.registry import NETWORKS, TIMM_NETWORKS

if os.environ.get("MEDFUSIONNET_REQUIRE_TIMM"):  # set by CI's baselines environment: a missing timm is a failure
    import timm
else:
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (the 'baselines' extra)")


LATE_FUSION = [n for n in TIMM_NETWORKS if n != "timm" and issubclass(NETWORKS[n], TimmTabular)]


@pytest.mark.parametrize("name", LATE_FUSION)
def test_timm_baselines_give_logits_with_and_without_tabular(name):
    torch.manual_seed(0)
    size = 96 if name.startswith("inception") else 64
    net = medfusionnet.create_network(name, image_size=size).eval()
    image = torch.rand(2, 1, size, size)
    with torch.no_grad():
        missing = net(image)
        assert missing.shape == (2, 14) and torch.isfinite(missing).all()
        # no tabular input means every field missing, as for the bundle's own networks
        torch.testing.assert_close(net(image, net.late_fusion.tabular.missing_input.expand(2, -1)), missing)
        # (features, not logits: a randomly initialised Inception's eval-mode logits reach 1e7 and swamp the rest)
        ones = torch.ones(2, medfusionnet.NUM_TABULAR_FEATURES)
        assert not torch.allclose(net.forward_features(image, ones), net.forward_features(image))
    without = medfusionnet.create_network(name, image_size=size, use_tabular=False)
    assert without.late_fusion.head.in_features == net.late_fusion.head.in_features - 32


def test_any_timm_model_by_name_and_a_training_step():
    net = medfusionnet.create_network("timm", model_name="resnet18", image_size=64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    image, target = torch.rand(4, 1, 64, 64), torch.zeros(4, 14)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image), target)
    loss.backward()
    optimizer.step()
    assert torch.nn.functional.binary_cross_entropy_with_logits(net(image), target) < loss


def test_local_pretrained_weights_adapt_the_rgb_stem(tmp_path):
    rgb = timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / "resnet18.pt"
    torch.save(rgb.state_dict(), path)
    net = medfusionnet.create_network("timm", model_name="resnet18", pretrained_path=str(path), image_size=64)
    torch.testing.assert_close(net.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in rgb.state_dict().items() if not k.startswith("layer4")}, partial)
    with pytest.raises(ValueError, match="partial.pt lacks"):
        medfusionnet.create_network("timm", model_name="resnet18", pretrained_path=str(partial))


def _trainable_fraction(net):
    params = list(net.backbone.parameters())
    return sum(not p.requires_grad for p in params) / len(params)


def test_convfcmae_head_freezing_and_a_training_step(tmp_path):
    from medfusionnet.networks.related import CONVFCMAE_FROZEN_FRACTION

    torch.manual_seed(0)
    net = medfusionnet.create_network("convfcmae", model_name="convnextv2_atto", image_size=64)
    assert _trainable_fraction(net) == 0  # random weights: nothing frozen unless asked
    image, tab = torch.rand(3, 1, 64, 64), torch.rand(3, medfusionnet.NUM_TABULAR_FEATURES)
    net.eval()
    with torch.no_grad():
        out = net(image)
        assert out.shape == (3, 14)
        torch.testing.assert_close(net(image, net.tabular.missing_input.expand(3, -1)), out)
        assert not torch.allclose(net(image, tab), out)
    # the paper's share of the layers is frozen when pretrained weights are given
    rgb = timm.create_model("convnextv2_atto", pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / "atto.pt"
    torch.save(rgb.state_dict(), path)
    frozen = medfusionnet.create_network("convfcmae", model_name="convnextv2_atto", pretrained_path=str(path))
    assert abs(_trainable_fraction(frozen) - CONVFCMAE_FROZEN_FRACTION) < 0.02
    torch.testing.assert_close(frozen.backbone.stem[0].weight, rgb.stem[0].weight.sum(1, keepdim=True))
    # a training step moves the head and the open layers, never the frozen ones (a batch of one included)
    frozen.train()
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    optimizer = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    for batch in (image, image[:1]):
        torch.nn.functional.binary_cross_entropy_with_logits(
            frozen(batch, tab[: len(batch)]), torch.ones(len(batch), 14)
        ).backward()
        optimizer.step()
    for name, p in frozen.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name
    with pytest.raises(ValueError, match="frozen_fraction"):
        medfusionnet.create_network("convfcmae", model_name="convnextv2_atto", frozen_fraction=1.0)


def test_default_ensemble_averages_densenet_efficientnet_inception():
    torch.manual_seed(0)
    net = medfusionnet.create_network("ensemble", image_size=96).eval()
    assert net.member_names == ["densenet121", "efficientnet_b0", "inception_v3"]
    image = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        probs = torch.stack([torch.sigmoid(m(image)) for m in net.members]).mean(0)
        torch.testing.assert_close(torch.sigmoid(net(image)), probs, atol=1e-5, rtol=1e-4)
