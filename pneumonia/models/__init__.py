"""Chest X-ray classifiers by name (`factory`). Importing the model modules here registers
their builders before anything asks the registry for one."""

from pneumonia.models import (  # noqa: F401  (they register themselves)
    baselines,
    dp_nets,
    ensemble_model,  # noqa: F401  (registers model.name ensemble)
    se_resnet,
)
