"""torchx-ext: TorchX schedulers for heterogeneous groups on Ray, Slurm, Docker and this host.

Kept import-free on purpose: ``torchx_ext_builtins.pth`` imports a submodule at every interpreter
start, and ``torchx runopts``/``--dryrun`` must stay cheap.
"""

__version__ = "0.1.0"
