"""The one exception type kvtool raises for bad input.

The CLI turns a :class:`KvtoolError` into a single ``error: ...`` line and exit code 2.
Messages name the problem and the fix.
"""


class KvtoolError(Exception):
    """Bad input or an unsupported setup; the message says what is wrong and how to fix it."""
