"""Baseline networks with the bundle's interface: ``forward(image, tabular=None) -> logits (B, num_classes)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from monai.networks.nets import DenseNet121
from torch import nn

from ..data.tabular import NUM_TABULAR_FEATURES, missing_tabular_vector


class TabularMLP(nn.Module):
    """Embeds the encoded tabular vector ``(B, F)`` into ``(B, embed_dim)``.

    ``None`` stands for "all fields missing" and is embedded as `tabular.missing_tabular_vector`, so one-input tools
    (``verify_net_in_out``, ``ckpt_export``) can call the network and the result equals passing that vector.
    """

    def __init__(self, num_tabular_features: int = NUM_TABULAR_FEATURES, embed_dim: int = 32):
        super().__init__()
        self.num_tabular_features = num_tabular_features
        self.mlp = nn.Sequential(nn.Linear(num_tabular_features, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        missing = torch.from_numpy(missing_tabular_vector(num_tabular_features))
        self.register_buffer("missing_input", missing, persistent=False)

    def forward(self, tabular: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        if tabular is None:
            tabular = self.missing_input.unsqueeze(0).expand(batch_size, -1)
        return self.mlp(tabular)


class LateFusionHead(nn.Module):
    """The baselines' classifier: pooled image features ``(B, D)``, the tabular embedding appended when
    ``use_tabular``, dropout and one linear layer: ``(features, tabular or None) -> logits (B, num_classes)``."""

    def __init__(
        self,
        num_image_features: int,
        num_classes: int,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        tabular_embed_dim: int = 32,
        dropout_rate: float = 0.2,
    ):
        super().__init__()
        self.use_tabular = use_tabular
        self.tabular = TabularMLP(num_tabular_features, tabular_embed_dim) if use_tabular else None
        self.dropout = nn.Dropout(dropout_rate)
        self.head = nn.Linear(num_image_features + (tabular_embed_dim if use_tabular else 0), num_classes)

    def fuse(self, features: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled image features with the tabular embedding appended when ``use_tabular``: ``(B, D [+ E])``."""
        if self.tabular is not None:
            features = torch.cat([features, self.tabular(tabular, features.shape[0])], dim=1)
        return features

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from `fuse`'s output."""
        return self.head(self.dropout(fused))

    def forward(self, features: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.classify(self.fuse(features, tabular))


class LateFusionClassifier(nn.Module, ABC):
    """Base of the baselines: pooled image features from the subclass's ``image_features``, then `LateFusionHead`
    (``late_fusion``)."""

    def _build_head(
        self,
        num_image_features: int,
        num_classes: int,
        num_tabular_features: int,
        use_tabular: bool,
        tabular_embed_dim: int,
        dropout_rate: float,
    ) -> None:
        self.late_fusion = LateFusionHead(
            num_image_features, num_classes, num_tabular_features, use_tabular, tabular_embed_dim, dropout_rate
        )

    @abstractmethod
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled image features ``(B, D)``; defined by each baseline."""

    def forward_features(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled image features, with the tabular embedding appended when ``use_tabular``: ``(B, D)``."""
        return self.late_fusion.fuse(self.image_features(image), tabular)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from `forward_features`' output."""
        return self.late_fusion.classify(features)

    def forward(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, tabular))


class DenseNet121Tabular(LateFusionClassifier):
    """MONAI's DenseNet-121 on a 1-channel X-ray, with the tabular embedding concatenated before the classifier.

    Shapes: image ``(B, in_channels, H, W)`` (H, W >= 32), tabular ``(B, num_tabular_features)`` or None;
    returns logits ``(B, num_classes)`` without activation. ``image_size`` is taken as every registered network takes
    it and not used: the network pools globally, so any input side works.
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        tabular_embed_dim: int = 32,
        dropout_rate: float = 0.2,
        image_size: Optional[int] = None,
    ):
        super().__init__()
        backbone = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
        self.features = backbone.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._build_head(
            backbone.class_layers.out.in_features,
            num_classes,
            num_tabular_features,
            use_tabular,
            tabular_embed_dim,
            dropout_rate,
        )

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """DenseNet's last feature map, ReLU and global average pooling: ``(B, 1024)``."""
        return torch.flatten(self.pool(torch.relu(self.features(image))), 1)


def import_timm(network: str):
    """The ``timm`` module, for the network named ``network``.

    Raises:
        ImportError: naming the network and the extra to install when timm (or a matching torchvision) is missing.
    """
    try:
        import timm
    except ImportError as e:  # torchvision, which timm needs, must match the installed torch
        raise ImportError(f"network '{network}' needs timm: pip install \"medfusionnet[baselines]\"") from e
    return timm


def load_timm_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local timm state dict file into a timm ``backbone``: an RGB first convolution is summed to the
    backbone's input channels with timm's ``adapt_input_conv``, and the original classifier is dropped.

    Raises:
        ValueError: naming the file when backbone weights other than the classifier's are missing from it.
    """
    from timm.models import adapt_input_conv

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    cfg = backbone.pretrained_cfg
    own = backbone.state_dict()
    first = f"{cfg['first_conv']}.weight" if isinstance(cfg.get("first_conv"), str) else None
    if first in state and first in own and state[first].shape[1] != own[first].shape[1]:
        state[first] = adapt_input_conv(own[first].shape[1], state[first])
    classifier = cfg.get("classifier")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(c and k.startswith(f"{c}.") for c in classifiers)}
    missing, _ = backbone.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} backbone weight(s) of '{cfg.get('architecture')}', e.g. " f"{missing[:3]}"
        )


class TimmTabular(LateFusionClassifier):
    """A backbone from timm (``pip install "medfusionnet[baselines]"``) on a 1-channel X-ray, with the tabular
    embedding concatenated to its pooled features before the classifier: the comparison networks of the paper
    (ResNet-50, ConvNeXt, DeiT, Inception-ResNet-v2) with the same interface and head as `DenseNet121Tabular`.

    Subclasses fix ``timm_name``; ``model_name`` overrides it. ``pretrained_path`` initialises the backbone from a
    local timm state dict file (nothing is downloaded): an RGB first convolution is summed to ``in_channels`` with
    timm's ``adapt_input_conv`` and the original classifier is dropped.

    Raises:
        ImportError: naming the extra to install when timm is missing.
    """

    timm_name = ""

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        tabular_embed_dim: int = 32,
        dropout_rate: float = 0.2,
        image_size: int = 224,
        model_name: Optional[str] = None,
        pretrained_path: Optional[str] = None,
    ):
        super().__init__()
        timm = import_timm(model_name or self.timm_name)
        name = model_name or self.timm_name
        extra = {"img_size": int(image_size)} if name.startswith(("deit", "vit")) else {}
        self.backbone = timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0, **extra)
        if pretrained_path:
            self.load_backbone_weights(pretrained_path)
        self._build_head(
            self.backbone.num_features, num_classes, num_tabular_features, use_tabular, tabular_embed_dim, dropout_rate
        )

    def load_backbone_weights(self, path: str) -> None:
        """Load a local timm state dict into the backbone (`load_timm_backbone_weights`)."""
        load_timm_backbone_weights(self.backbone, path)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``(B, num_features)``."""
        return self.backbone(image)


class ResNet50Tabular(TimmTabular):
    """ResNet-50 (He et al. 2016) through timm, with the tabular embedding; a baseline of the MedFusionNet paper."""

    timm_name = "resnet50"


class ConvNeXtTinyTabular(TimmTabular):
    """ConvNeXt-T (Liu et al. 2022) through timm, with the tabular embedding; a baseline of the MedFusionNet paper."""

    timm_name = "convnext_tiny"


class DeiTSmallTabular(TimmTabular):
    """DeiT-S (Touvron et al. 2021; 16 px patches, position embeddings for ``image_size``) through timm, with the
    tabular embedding; a baseline of the MedFusionNet paper."""

    timm_name = "deit_small_patch16_224"


class InceptionResNetV2Tabular(TimmTabular):
    """Inception-ResNet-v2 (Szegedy et al. 2017) through timm, with the tabular embedding; a baseline of the
    MedFusionNet paper (inputs of 75 px or more)."""

    timm_name = "inception_resnet_v2"


class EfficientNetB0Tabular(TimmTabular):
    """EfficientNet-B0 (Tan and Le 2019) through timm, with the tabular embedding; a member of the ensemble of
    ``seeds/004`` (`related.ProbabilityEnsemble`)."""

    timm_name = "efficientnet_b0"


class InceptionV3Tabular(TimmTabular):
    """Inception-v3 (Szegedy et al. 2016) through timm, with the tabular embedding; a member of the ensemble of
    ``seeds/004`` (inputs of 75 px or more)."""

    timm_name = "inception_v3"
