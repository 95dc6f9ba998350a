"""Triton kernels of pf_engine, installed as ``pf_engine.kernels``.

One op per module: the ``@triton.jit`` kernel and its thin launcher. Nothing
here is called directly by the engine: ``KVCache.copy_blocks`` and
``pf_engine.resample.resample`` decide where each op runs. Set
``TRITON_INTERPRET=1`` before importing a module here to run it on the CPU.
"""
