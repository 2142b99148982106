"""Chest X-ray classifiers by name (`registry`). Importing the model modules here registers
their builders before anything asks the registry for one."""

from pneumonia.models import baselines, se_resnet  # noqa: F401  (they register themselves)
