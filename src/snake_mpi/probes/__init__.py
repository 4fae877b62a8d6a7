"""Small measurement backends, each able to say whether it works here (``available()``).

``memory`` samples this process's RSS and CPU in a thread, ``storage`` counts bytes written to
disk, ``gpu`` reports device memory where a GPU is present. None of them needs MPI: ``run.py``
starts them on every rank and ``record.py`` reads them at round boundaries.
"""
