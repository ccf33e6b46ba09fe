"""``python -m pyneuron`` runs the ``pyneuron`` command."""

from .app.cli import main

if __name__ == "__main__":
    main()
