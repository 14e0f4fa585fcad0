"""vlmexport: export distilvit-style captioning models to verified ONNX bundles."""

__version__ = "0.1.0"
