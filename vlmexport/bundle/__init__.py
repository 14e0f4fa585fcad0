"""The bundle format, torch-free: manifest, tensor names, preprocessing, tokenizer, decoding options.

Everything that reads or writes a bundle builds on this package (runtime, serve, quantize,
validate, the exporter); it imports only numpy, pillow and tokenizers, so a runtime-only
install (`pip install vlmexport`) can caption without PyTorch.
"""
