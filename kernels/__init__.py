"""Triton kernels of pf_engine, installed as ``pf_engine.kernels``.

One op per module, each with its torch reference beside it. Set
``TRITON_INTERPRET=1`` before importing a module here to run it on the CPU.
"""
