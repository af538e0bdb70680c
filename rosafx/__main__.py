"""``python -m rosafx ...`` is the ``rosafx`` command; torchrun starts it this way:
``torchrun --nproc_per_node N -m rosafx train ...``."""
from rosafx.cli.main import main

if __name__ == "__main__":
    main()
