"""The application: the ``pyneuron`` command, run directories, the demo."""
