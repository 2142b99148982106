"""What a model's predictions are worth: the torchmetrics collections and the threshold
metrics (`classification`), and bootstrap intervals over patients (`intervals`)."""
