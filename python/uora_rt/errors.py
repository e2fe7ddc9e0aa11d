"""Error types of uora_rt. Every one is a ValueError, so callers that validate input catch them."""


class AdapterFormatError(ValueError):
    """A `.uora` (or foreign adapter) file is malformed or does not fit the model it is loaded into.

    The message always names the file, the key, what was expected and what was found.
    """

    def __init__(self, path, key, expected, found):
        self.path, self.key, self.expected, self.found = str(path), key, expected, found
        super().__init__(f"{self.path}: {key}: expected {expected}, found {found}")
