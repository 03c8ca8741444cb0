import itertools

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121

import medfusionnet
from medfusionnet.blocks import class_prior
from medfusionnet.network import BRANCHES, MedFusionNet
from medfusionnet.tabular import NUM_TABULAR_FEATURES, TabularEncoder, missing_tabular_vector


def _tabular(batch: int) -> torch.Tensor:
    """Encoded tabular rows, every other one with all fields missing (so the missing embeddings are used too)."""
    enc = TabularEncoder().fit([{"age": 30, "follow_up": 1}, {"age": 70, "follow_up": 5}])
    rows = [{"age": 20 + 10 * i, "sex": "MF"[i % 2], "view": ["PA", "AP"][i % 2], "follow_up": i} if i % 2 == 0
            else {} for i in range(batch)]
    return torch.from_numpy(enc.transform(rows))


@pytest.mark.parametrize("batch, size, classes", [(1, 64, 7), (3, 96, 14), (2, 128, 5), (2, 224, 7), (1, 512, 3)])
def test_output_shape(batch, size, classes):
    net = MedFusionNet(num_classes=classes, size="tiny").eval()
    with torch.no_grad():
        out = net(torch.rand(batch, 1, size, size), _tabular(batch))
    assert out.shape == (batch, classes) and torch.isfinite(out).all()


ABLATIONS = [
    dict(branches=branches, interaction=interaction, fpn=fpn, fusion=fusion, use_tabular=use_tabular,
         class_reweighting=reweighting)
    for r in range(1, 4) for branches in itertools.combinations(BRANCHES, r)
    for interaction, fpn, fusion, use_tabular, reweighting in itertools.product(
        (True, False), (True, False), ("attention", "concat"), (True, False), (True, False))
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_every_parameter_gets_a_gradient(options):
    torch.manual_seed(0)
    net = MedFusionNet(num_classes=7, size="tiny", **options)
    net(torch.rand(4, 1, 64, 64), _tabular(4)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ablation_switches_change_the_network():
    full = MedFusionNet(size="tiny")
    assert full.interaction and full.fpn is not None and full.tabular_tokens is not None
    assert not MedFusionNet(size="tiny", branches=("cnn", "relational")).interaction
    no_rel = MedFusionNet(size="tiny", branches=("cnn", "transformer"))
    assert all(layer.self_attn is None for layer in no_rel.decoder)
    assert MedFusionNet(size="tiny", fusion="concat").concat_mlp is not None
    for bad in (dict(branches=()), dict(branches=("cnn", "lstm")), dict(fusion="sum"), dict(size="huge")):
        with pytest.raises(ValueError):
            MedFusionNet(**bad)


def test_eval_determinism_and_batch_size_independence():
    torch.manual_seed(0)
    net = MedFusionNet(size="tiny").eval()
    image, tab = torch.rand(4, 1, 64, 64), _tabular(4)
    with torch.no_grad():
        whole = net(image, tab)
        torch.testing.assert_close(net(image, tab), whole)
        parts = torch.cat([net(image[i : i + 1], tab[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-4)


def test_no_tabular_equals_all_missing_tabular():
    net = MedFusionNet(size="tiny").eval()
    image = torch.rand(2, 1, 64, 64)
    missing = torch.from_numpy(missing_tabular_vector()).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(net(image), net(image, missing))
        assert not torch.allclose(net(image), net(image, _tabular(2)))


@pytest.mark.parametrize("options", [{}, dict(fusion="concat"), dict(branches=("cnn",), fpn=False),
                                     dict(branches=("transformer", "relational"), use_tabular=False)])
def test_torchscript_parity(options):
    net = MedFusionNet(size="tiny", **options).eval()
    scripted = torch.jit.script(net)
    image, tab = torch.rand(2, 1, 96, 96), _tabular(2)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image, tab), net(image, tab), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scripted(image), net(image), atol=1e-4, rtol=1e-4)


def test_class_reweighting_starts_at_the_prior():
    counts = [1000, 100, 10, 500, 50, 5, 200]
    net = MedFusionNet(num_classes=7, size="tiny", label_counts=counts)
    prior = class_prior(counts, 7)
    torch.testing.assert_close(net.reweighting.gains(), prior, atol=1e-5, rtol=1e-5)
    expected = (1 / np.sqrt(counts)) / np.mean(1 / np.sqrt(counts))  # inverse sqrt-frequency, mean 1
    np.testing.assert_allclose(prior.numpy(), np.clip(expected, 1 / 3, 3), rtol=1e-5)
    assert prior[5] > prior[0]  # the rarest finding gets the largest gain
    torch.testing.assert_close(MedFusionNet(num_classes=7, size="tiny").reweighting.gains(), torch.ones(7))
    with pytest.raises(ValueError, match="num_classes=7"):
        MedFusionNet(num_classes=7, size="tiny", label_counts=[1, 2])


def test_cnn_initialisation_from_a_densenet_file(tmp_path):
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=14)
    monai_file = tmp_path / "monai.pt"
    torch.save(reference.state_dict(), monai_file)
    net = MedFusionNet(size="base")
    unused = net.load_cnn_weights(str(monai_file))
    assert all(k.startswith("class_layers") for k in unused)
    torch.testing.assert_close(net.stem[0].weight, reference.features.conv0.weight)
    torch.testing.assert_close(net.stages[3].cnn[1].denselayer16.layers.conv2.weight,
                               reference.features.denseblock4.denselayer16.layers.conv2.weight)
    # torchvision's names and a 3-channel first convolution (ImageNet weights) are accepted too
    torchvision_style = {}
    for key, value in reference.state_dict().items():
        key = key.replace(".layers.", ".")
        if key == "features.conv0.weight":
            value = value.repeat(1, 3, 1, 1)
        torchvision_style[key] = value
    tv_file = tmp_path / "tv.pt"
    torch.save(torchvision_style, tv_file)
    net2 = MedFusionNet(size="base")
    net2.load_cnn_weights(str(tv_file))
    # RGB kernels are summed: on a gray image the 1-channel network responds as the RGB one on its 3 copies
    torch.testing.assert_close(net2.stem[0].weight, 3 * reference.features.conv0.weight)
    with pytest.raises(ValueError, match="not a matching DenseNet|expected"):
        MedFusionNet(size="tiny").load_cnn_weights(str(monai_file))


def test_registry_builds_both_and_reports_unused_options(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        net = medfusionnet.create_network("densenet121", num_classes=3, fusion="concat", use_tabular=True)
    assert "does not use fusion" in caplog.text and net(torch.rand(1, 1, 64, 64)).shape == (1, 3)
    assert isinstance(medfusionnet.create_network("medfusionnet", size="tiny"), MedFusionNet)
    with pytest.raises(ValueError, match="network_name='resnet'"):
        medfusionnet.create_network("resnet")


@pytest.mark.slow
def test_tiny_model_overfits_real_images(nih_dir):
    from medfusionnet.data import prepare_datasets
    from medfusionnet.transforms import xray_transforms

    data = prepare_datasets(str(nih_dir), str(nih_dir / "labels.csv"), str(nih_dir / "images_256"))
    transform = xray_transforms(data.encoder, 64)
    items = [transform(r) for r in data.train[:32]]
    image = torch.stack([i["image"] for i in items])
    tab = torch.stack([i["tabular"] for i in items])
    label = torch.stack([i["label"] for i in items])
    torch.manual_seed(0)
    net = MedFusionNet(size="tiny", drop_path_rate=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image, tab), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], (losses[0], losses[-1])
    assert NUM_TABULAR_FEATURES == tab.shape[1]


def test_fpn_channels_override_widens_the_pyramid_only():
    narrow = MedFusionNet(size="tiny", image_size=64)
    wide = MedFusionNet(size="tiny", image_size=64, fpn_channels=48)
    assert narrow.fpn.layer_blocks[0].out_channels == 32 and wide.fpn.layer_blocks[0].out_channels == 48
    assert [p.in_features for p in wide.cnn_token_proj] == [48, 48, 48]
    assert wide(torch.rand(2, 1, 64, 64)).shape == (2, 14)
