"""Moving bytes between ranks: ``hops`` (``Hops``, the face a scheme sends, posts and receives
model blocks by), ``protocol`` (``Communicator``, the interface every communicator meets),
``mpi/`` (MPI ranks; the only modules that import mpi4py), ``localcomm`` (ranks as threads, for
tests without MPI), ``wire`` (message headers, ``Transfer``/``TransferSpec`` and byte
accounting) and ``payloads`` (the host/device buffers a hop travels in)."""
