"""Deployment: export (ONNX, TorchScript) with parity checks, artifact metadata, ONNX Runtime, prediction, quantization."""
