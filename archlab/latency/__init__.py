"""The latency lab: export blocks and networks to ONNX bundles, time them on the target device."""
