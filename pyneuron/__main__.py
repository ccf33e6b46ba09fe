"""``python -m pyneuron`` runs the ``pyneuron`` command."""

from .cli import main

if __name__ == "__main__":
    main()
