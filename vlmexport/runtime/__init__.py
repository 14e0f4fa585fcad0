"""Running a bundle with ONNX Runtime: sessions per component, the decoding loop, and `Captioner`."""

from vlmexport.runtime.captioner import Caption, Captioner

__all__ = ["Caption", "Captioner"]
