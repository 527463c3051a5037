"""The base of errors that are the user's to fix (bad input, missing bucket or
credentials): the CLI prints their message and exits 2, without a traceback."""


class DriversError(Exception):
    pass


class RunInputError(ValueError):
    """Bad trigger parameters or run-time inputs: retrying cannot help."""
