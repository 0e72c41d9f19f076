"""Errors shared across layers."""


class UserError(Exception):
    """Something the user can fix (address in use, not root, missing device): printed as one line, exit 1.

    The message must read well on its own after "pytier-core: error: ", and should say what to do.
    """
