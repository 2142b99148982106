"""A trained model at work: scoring image sets with intervals (`scoring`), Grad-CAM
(`explain`), predicting from a checkpoint (`predictor`) or an ONNX file (`onnx_model`)."""
