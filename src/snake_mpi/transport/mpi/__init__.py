"""The MPI side of the transport, the only modules that import mpi4py: ``comm`` (``Comm``: a
ring's block transfers and the gathers of figures to rank 0), ``hop_plan`` (``HopPlan``: a
repeating hop by persistent requests) and ``world`` (the job's world, its start-up agreement,
CUDA support, and ending the job on an error)."""
