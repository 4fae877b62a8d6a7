"""Moving bytes between ranks: ``protocol`` (``Communicator``, the interface schemes use),
``comm`` (MPI; the only module that imports mpi4py), ``localcomm`` (ranks as threads, for tests
without MPI), ``wire`` (message headers, ``Transfer``/``TransferSpec`` and byte accounting) and
``payloads`` (the host/device buffers a hop travels in)."""
