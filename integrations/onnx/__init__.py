"""ONNX integration: onnxscript rewrite rules built from the pattern catalogue."""
