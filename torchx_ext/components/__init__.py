"""Components that build heterogeneous groups (see :mod:`torchx_ext.components.group`)."""
