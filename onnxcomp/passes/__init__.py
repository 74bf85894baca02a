"""Compression passes, one module per family. See onnxcomp.registry for the names."""
