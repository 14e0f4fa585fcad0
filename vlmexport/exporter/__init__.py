"""Export a checkpoint's components to ONNX graphs and assemble the bundle."""
