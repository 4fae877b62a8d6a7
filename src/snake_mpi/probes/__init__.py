"""Small measurement backends, each able to say whether it works here.

``memory`` samples this process's RSS and CPU in a thread (and, through its ``extra`` hook,
whatever another probe samples at the same ticks), ``storage`` counts bytes written to disk,
``gpu`` reads a GPU rank's memory, power, utilisation and energy (torch and NVML), ``rapl`` the
host's CPU-package energy. None of them needs MPI: ``run.py`` starts them on every rank and
``record.py`` reads them at round boundaries.
"""
