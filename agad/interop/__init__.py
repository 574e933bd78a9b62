"""Weights from and to other frameworks (PyTorch state dicts: :mod:`agad.interop.torch_checkpoint`)."""
