"""The one error type for user mistakes. Its message says what to do next."""


class RosafxError(Exception):
    """A problem with the user's input or request, with a message that says what to do."""
