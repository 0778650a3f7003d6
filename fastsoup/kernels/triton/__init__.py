"""Triton kernels and their launchers. No autograd and no backend policy here: the
``fastsoup.ops`` modules decide when these run. Importing this package requires triton."""
