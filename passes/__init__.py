"""Shipped recipes, installed as the package ``onnxcomp.recipes`` so ``onnxcomp run NAME`` finds them."""
