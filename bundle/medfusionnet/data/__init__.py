"""The data layer: NIH tables and splits (`nih`), image files (`image_reader`), unreadable files (`unreadable`),
tabular encoding (`tabular`), MONAI transforms and datasets (`transforms`), loaders (`loaders`), the balanced sampler
(`samplers`), label weights (`label_weights`) and the synthetic demo set (`demo`)."""
