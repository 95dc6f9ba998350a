"""Triton kernels of pf_engine, installed as ``pf_engine.kernels``.

One op per module: the ``@triton.jit`` kernel and its thin launcher. Each is
called from one place that decides where the op runs: ``KVCache.copy_blocks``
(block copies), ``pf_engine.resample.resample`` (the fused resampling step) and
the Triton attention backend (``pf_engine.attention.triton_backend``, paged
decode). Set ``TRITON_INTERPRET=1`` before importing a module here to run it
on the CPU.
"""
