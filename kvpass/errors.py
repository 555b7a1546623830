"""Errors kvpass raises. All derive from :class:`KVPassError` (a ``ValueError``), so a caller can catch
one type; each message names what was wrong and what would be accepted."""


class KVPassError(ValueError):
    """Base class of every error kvpass raises on bad input."""


class UnknownMethodError(KVPassError):
    """A method (scheme or policy) name that is not registered."""


class OptionError(KVPassError):
    """An unknown option, or an option value out of its range."""


class ShapeError(KVPassError):
    """A tensor whose shape or dtype does not match the cache it is given to."""


class NonFiniteError(KVPassError):
    """NaN or inf in keys or values handed to a cache."""


class CapacityError(KVPassError):
    """Appending more tokens than the preallocated cache holds."""
