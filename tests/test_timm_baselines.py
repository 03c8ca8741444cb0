"""The paper's comparison networks through timm (optional: ``pip install "medfusionnet[baselines]"``; CI runs these
tests in a virtual environment that has it)."""

import os

import pytest
import torch

import medfusionnet
from medfusionnet.registry import TIMM_NETWORKS

if os.environ.get("MEDFUSIONNET_REQUIRE_TIMM"):  # set by CI's baselines environment: a missing timm is a failure
    import timm
else:
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (the 'baselines' extra)")


@pytest.mark.parametrize("name", [n for n in TIMM_NETWORKS if n != "timm"])
def test_timm_baselines_give_logits_with_and_without_tabular(name):
    torch.manual_seed(0)
    size = 96 if name == "inception_resnet_v2" else 64
    net = medfusionnet.create_network(name, image_size=size).eval()
    image = torch.rand(2, 1, size, size)
    with torch.no_grad():
        missing = net(image)
        assert missing.shape == (2, 14) and torch.isfinite(missing).all()
        # no tabular input means every field missing, as for the bundle's own networks
        torch.testing.assert_close(net(image, net.tabular.missing_input.expand(2, -1)), missing)
        assert not torch.allclose(net(image, torch.ones(2, medfusionnet.NUM_TABULAR_FEATURES)), missing)
    without = medfusionnet.create_network(name, image_size=size, use_tabular=False)
    assert without.head.in_features == net.head.in_features - 32


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
