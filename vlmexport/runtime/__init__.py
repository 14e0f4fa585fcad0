"""Running a bundle with ONNX Runtime: sessions per component, and the decoding loop."""
