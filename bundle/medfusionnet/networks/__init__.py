"""The networks: MedFusionNet (`medfusionnet`), its building blocks (`blocks`) and label-query fusion
(`label_query_fusion`), the DenseNet-121 and timm baselines (`baselines`), the related systems (`related`) and the
registry that builds any of them by name (`registry`)."""
