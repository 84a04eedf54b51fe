"""The one error type a user sees: a single line naming the field and the value (exit status 2)."""


class ArchlabError(ValueError):
    """Bad user input (YAML, a space, a table, a flag). The CLI prints it as one line and exits 2."""
