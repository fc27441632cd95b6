"""The one exception type that means "the user gave us something wrong".

The CLI prints an ``OrchardError`` as a single line and exits with status 2; any other exception is
a bug in orchard and keeps its traceback. Library code raises it with a message that names the
file and line, or the config key, so the user can fix the input without reading code.
"""


class OrchardError(Exception):
    """A problem with the user's input (file, data record, config value), reported in one line."""
