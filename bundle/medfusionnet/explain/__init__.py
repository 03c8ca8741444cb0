"""Explanations: saliency maps and their localisation scores (`saliency`) and the explanation workflow
(`workflow`)."""
